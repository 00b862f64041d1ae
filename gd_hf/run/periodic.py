"""The work a phase does after a step when it is due, as hooks of one signature, `work(phase)`: the metrics log
line (and the trackers), the evaluation, its pictures, the curves, the best export, the checkpoint
(`PERIODIC_WORK`, in the order they run); and
the phase's end (`finish_phase`: the final export and push). Each hook reads and writes only the `Phase`."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object

from gd_hf.config import TrainConfig, recipe_to_dict
from gd_hf.curves import plot_curves
from gd_hf.evaluation.mask_ap import (
    EvalSettings,
    Evaluation,
    NonFinitePredictionsError,
    evaluate_mask_ap,
    write_results,
)
from gd_hf.files import write_text_atomic
from gd_hf.hub.public import run_name
from gd_hf.run.checkpointing import save_checkpoint
from gd_hf.run.distributed import replica_fingerprints
from gd_hf.run.eval_pictures import (
    EXPORT_EXAMPLES,
    jpeg_bytes,
    png_bytes,
    prediction_picture,
    pseudo_label_picture,
    save_picture,
)
from gd_hf.run.metrics_log import LogWindow, format_metrics, log_record, read_metrics_log, side_by_side
from gd_hf.run.phase import Phase
from gd_hf.run.step import TrainingError, last_good_checkpoint
from gd_hf.run.trackers import log_pictures
from gd_hf.weights import check_finite

logger = logging.getLogger("gd_hf.train")


@dataclass(frozen=True)
class PeriodicWork:
    """`work(phase)` after a step, every `every(train settings)` steps (0: never) and after the last step."""

    name: str
    every: Callable[[TrainConfig], int]
    work: Callable[[Phase], None]

    def due(self, phase: Phase, step: int) -> bool:
        return is_due(self.every(phase.recipe.train), step, phase.recipe.train.max_steps)


def is_due(every: int, step: int, max_steps: int) -> bool:
    """Whether work done every `every` steps (0: never) is due after `step` steps: also after the last."""
    return bool(every and step % every == 0) or step == max_steps


def write_log_line(phase: Phase) -> None:
    """One metrics.jsonl line (rank 0 writes it): the window's means over all processes, the counts so far,
    speed, memory, and, after a launch's first step, its start-up time."""
    accelerator = phase.accelerator
    # Bad records skipped so far (data.on_error: skip), over all processes.
    skipped = accelerator.reduce(torch.tensor(phase.skipped_since_checkpoint, device=accelerator.device), "sum")
    counts = {"nonfinite_steps": phase.state.nonfinite_steps, "data_skipped": phase.state.data_skipped + skipped.item(),
              "step": phase.state.step, "lr": phase.scheduler.get_last_lr()[-1]}  # fmt: skip
    log_record(accelerator, phase.output_dir / "metrics.jsonl", phase.log.record(accelerator, counts))
    phase.log = LogWindow(first_of_launch=False)


def evaluate(phase: Phase, model: torch.nn.Module) -> Evaluation:
    """Mask AP of `model` on the val split (`eval.max_images` of it): each process predicts its share."""
    recipe, data, accelerator = phase.recipe, phase.data, phase.accelerator
    val = data.val if recipe.eval.max_images is None else data.val.select(
        range(min(recipe.eval.max_images, len(data.val))))  # fmt: skip
    settings = EvalSettings(recipe.data, phase.padding_divisor, recipe.eval.top_k, recipe.eval.batch_size,
                            min(recipe.data.num_workers, 2), accelerator.is_local_main_process, phase.family)  # fmt: skip
    try:
        return evaluate_mask_ap(model, val, data.val_ground_truth, data.categories.ids, settings, accelerator.device,
                                accelerator.process_index, accelerator.num_processes,
                                gather_object if accelerator.num_processes > 1 else None)  # fmt: skip
    except NonFinitePredictionsError as e:  # before the skipped-step streak stopped it: the same outcome, exit 4
        raise TrainingError(
            f"step {phase.state.step}: the evaluation cannot score the model: {e}. Training has diverged "
            f"({phase.state.nonfinite_in_a_row} update(s) in a row skipped before it). "
            f"{last_good_checkpoint(phase.output_dir / 'checkpoints')} Go on from it with a lower train.lr or "
            "train.backbone_lr_multiplier, or a train.grad_clip (resume=force: the change is recorded)."
        ) from e


def evaluate_phase(phase: Phase) -> None:
    """Val mask AP of the evaluated model (and of the teacher with `ssl.evaluate: both`): logged, its predictions
    written, and kept for the pictures (`phase.last_evaluation`) and the best export (`phase.metrics`)."""
    step = phase.state.step
    evaluation = evaluate(phase, phase.evaluated)
    metrics = evaluation.metrics
    logged = {f"val/{k}": v for k, v in metrics.items()}
    logged.update({f"eval/{k}": v for k, v in evaluation.costs.items()})
    if phase.method.teacher is not None and phase.recipe.ssl.evaluate == "both":
        teacher_metrics = evaluate(phase, phase.method.teacher.model).metrics
        logged.update({f"val_teacher/{k}": v for k, v in teacher_metrics.items()})
    phase.metrics = metrics
    if phase.accelerator.is_main_process:
        phase.last_evaluation = evaluation
        write_results(phase.output_dir / "predictions" / f"val_step_{step:08d}.json", evaluation.results)
        log_record(phase.accelerator, phase.output_dir / "metrics.jsonl", {"step": step, **logged})
        logger.info("step %d val mask AP %.2f (AP50 %.2f, AP75 %.2f)", step, metrics["AP"], metrics["AP50"],
                    metrics["AP75"])  # fmt: skip


def draw_evaluation_pictures(phase: Phase) -> None:
    """Rank 0, after an evaluation: its pictures (`draw_pictures`), and the export's example images chosen from
    what it found (`choose_examples`)."""
    evaluation, phase.last_evaluation = phase.last_evaluation, None  # (the results are not kept longer)
    if phase.accelerator.is_main_process and evaluation is not None:
        draw_pictures(phase, evaluation)
        choose_examples(phase, evaluation)


def choose_examples(phase: Phase, evaluation: Evaluation) -> None:
    """The export's example images (the card's snippet and a Space show them): of the first val images, the
    `EXPORT_EXAMPLES` on which the model finds the most instances scoring above 0.5 (ties: the first), not
    whichever come first."""
    confident = Counter(r["image_id"] for r in evaluation.results if r["score"] > 0.5)
    ranked = sorted(phase.picture_examples, key=lambda example: -confident[example[0]])  # (stable: ties in order)
    phase.publisher.examples = {f"val_{image_id}.jpg": jpeg_bytes(image)
                                for image_id, image in ranked[:EXPORT_EXAMPLES]}  # fmt: skip


def draw_curves_after_evaluation(phase: Phase) -> None:
    """Rank 0, after an evaluation: `curves.png` so far (`draw_curves`), which the next export shows."""
    if phase.accelerator.is_main_process:
        draw_curves(phase)


def export_if_best(phase: Phase) -> None:
    """A new best val AP is exported to `best/` (with the pictures and curves just drawn). Rank 0 decides the
    best; every rank learns it for the next checkpoint."""
    accelerator, state = phase.accelerator, phase.state
    if accelerator.is_main_process and phase.metrics["AP"] > state.best_ap:
        state.best_ap, state.best_step = phase.metrics["AP"], state.step
        phase.publisher.export(phase.evaluated, "best", state.step, phase.metrics)
    if accelerator.num_processes > 1:  # rank 0 decided; the rest of the state is alike on every rank
        state.best_ap, state.best_step = broadcast_object_list([(state.best_ap, state.best_step)])[0]


def save_phase_checkpoint(phase: Phase) -> None:
    """A checkpoint of the run: weights, optimizer, schedule, RNG, the EMA teacher, `state` (with the bad
    records of every process added up), each process's stream positions and, on several processes, the
    replicas' checksums."""
    accelerator, state, teacher = phase.accelerator, phase.state, phase.method.teacher
    skipped = accelerator.reduce(torch.tensor(phase.skipped_since_checkpoint, device=accelerator.device), "sum")
    state.data_skipped, phase.skipped_since_checkpoint = state.data_skipped + skipped.item(), 0
    if accelerator.num_processes > 1:
        state.replica_fingerprints = replica_fingerprints(accelerator, phase.student, teacher)
    check_finite(phase.student, "the student")  # a checkpoint is always one a run can go on from
    if teacher is not None:
        check_finite(teacher.model, "the teacher")
    # The checkpoint names the recipe that trained it: a relaunch compares its own with it.
    trainer_state = {**state.to_dict(), "num_processes": accelerator.num_processes,
                     "recipe": recipe_to_dict(phase.recorded_recipe)}  # fmt: skip
    if phase.extension_points:  # custom ones only: a run of the recipe's own records nothing here
        trainer_state["extension_points"] = phase.extension_points
    if phase.data.fingerprint:  # the files it read: a relaunch on data changed in place is a change
        trainer_state["data_fingerprint"] = phase.data.fingerprint
    save_checkpoint(accelerator, phase.output_dir / "checkpoints", state.step, trainer_state,
                    phase.recipe.train.keep_checkpoints, phase.batches.data_state(), phase.checkpointed_states())  # fmt: skip


# After each step, in this order, each when due (its `every` steps, and after the last step).
PERIODIC_WORK = [
    PeriodicWork("log line", lambda train: train.log_every, write_log_line),
    PeriodicWork("evaluation", lambda train: train.eval_every, evaluate_phase),
    PeriodicWork("pictures", lambda train: train.eval_every, draw_evaluation_pictures),
    PeriodicWork("curves", lambda train: train.eval_every, draw_curves_after_evaluation),
    PeriodicWork("best export", lambda train: train.eval_every, export_if_best),
    PeriodicWork("checkpoint", lambda train: train.checkpoint_every, save_phase_checkpoint),
]


def draw_pictures(phase: Phase, evaluation: Evaluation) -> None:
    """Rank 0: the val predictions beside their truth and the pseudo labels the student was just taught, into
    `OUTPUT/pictures/` and the trackers that take images; the predictions also go into the next export. A picture
    that cannot be drawn or written is a warning, never the run's end."""
    try:
        _draw_pictures(phase, evaluation, phase.state.step)
    except Exception as e:  # noqa: BLE001 - pictures are for people: a failure must not cost the run
        logger.warning("step %d: the evaluation's pictures were not drawn (%s: %s)", phase.state.step,
                       type(e).__name__, e)  # fmt: skip


def _draw_pictures(phase: Phase, evaluation: Evaluation, step: int) -> None:
    count, data = phase.recipe.eval.pictures, phase.data
    if not count:
        return
    pictures = {}
    evaluated = phase.picture_examples[: min(count, len(data.val), phase.recipe.eval.max_images or len(data.val))]
    pictures["val/predictions"] = prediction_picture(evaluated, evaluation.results, data.val_ground_truth,
                                                     data.categories.ids, data.categories.names, step)  # fmt: skip
    png = png_bytes(pictures["val/predictions"])  # encoded once: the folder's picture and the export's
    save_picture(png, phase.output_dir / "pictures" / f"val_step_{step:08d}.png")
    phase.publisher.pictures["predictions.png"] = png
    kept, phase.kept_pseudo_labels = phase.kept_pseudo_labels, None
    if kept is not None:
        pictures["pseudo/labels"] = pseudo_label_picture(kept, data.categories.names)
        save_picture(png_bytes(pictures["pseudo/labels"]),
                     phase.output_dir / "pictures" / f"pseudo_labels_step_{kept.step:08d}.png")  # fmt: skip
    log_pictures(phase.accelerator.trackers, pictures, step)


def draw_curves(phase: Phase) -> None:
    """Rank 0: `OUTPUT/curves.png` from the metrics log so far (phases marked); the next export shows it. A
    failure is a warning (the export goes without the curves)."""
    try:
        records = read_metrics_log(phase.output_dir / "metrics.jsonl")
        names = {"burn_in": "guided burn-in", "ema": "EMA distillation"}  # (supervised: as the bar calls it)
        phases = [(step, names.get(name) or phase.label(step))
                  for step, name in phase.method.phase_starts(phase.recipe.train.max_steps)]  # fmt: skip
        title = run_name(phase.recipe).replace("$", r"\$")  # matplotlib reads $...$ as mathematics
        path = plot_curves(records, phase.output_dir / "curves.png", phases, title=title)
        if path is not None:
            phase.publisher.pictures["curves.png"] = path.read_bytes()
    except Exception as e:  # noqa: BLE001 - as draw_pictures
        logger.warning("curves.png was not drawn (%s: %s)", type(e).__name__, e)


def finish_phase(phase: Phase) -> dict[str, Any]:
    """The final export (also when the run was already complete and only resumed to this point), its metrics,
    and the final push; the phase's trackers end. Returns the final val metrics."""
    accelerator, recipe, state = phase.accelerator, phase.recipe, phase.state
    metrics = phase.metrics
    if not metrics:  # a relaunch of a run whose last step was checkpointed but not exported
        evaluation = evaluate(phase, phase.evaluated)
        metrics = evaluation.metrics
        if accelerator.is_main_process:
            draw_pictures(phase, evaluation)
    if accelerator.is_main_process:
        draw_curves(phase)
        hub = recipe.hub  # a card pushed to a branch loads that branch
        model_id = (hub.repo_id + (f"@{hub.revision}" if hub.revision else "")) if hub.push else None
        final = phase.publisher.export(phase.evaluated, "final", state.step, metrics, model_id)
        final_summary = {"final": metrics, "best_ap": state.best_ap, "best_step": state.best_step}
        write_text_atomic(phase.output_dir / "final_metrics.json", json.dumps(final_summary, indent=2))
        print(format_metrics(metrics, state.step), flush=True)
        if phase.publisher.teacher_metrics is not None:
            print(side_by_side(phase.publisher.teacher_metrics, metrics), flush=True)
        if recipe.hub.push:
            message = f"Model after {state.step} steps (mask AP {metrics['AP']:.2f})"
            if phase.publisher.push(final, recipe.hub.revision, message) and recipe.hub.space_repo:
                phase.publisher.push_space(final)
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()  # the next phase starts its own
    phase.publisher.raise_failures()
    return metrics
