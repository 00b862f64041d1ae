"""The training recipe: `accelerate launch -m gd_hf.train recipes/NAME.yaml [key=value ...]`.

`TrainingRecipe` is one launch, in the manner of torchtune's recipes: `run` prepares the data once and runs the
phases in order on one Accelerator — phase 1, the supervised teacher (into `output_dir/teacher`, with
`ssl.train_teacher_first`), then phases 2-3, guided burn-in and EMA distillation — each as `set_up` (which
builds the `gd_hf.phase.Phase`: everything the phase trains with), `train` (the loop, `run_steps`: the method's
step, then the periodic work — log line, evaluation, checkpoint — each when due), `finish` (the final export and
push), and `end_phase` (the phase dropped whole). The method itself (its teacher, pseudo labels, schedule and
loss) is `gd_hf.method.GuidedDistillation`; one optimizer step is `gd_hf.step.train_step`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gd_hf.checkpointing import (
    RunState,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_data_state,
    read_trainer_state,
    save_checkpoint,
)
from gd_hf.config import Recipe, RecipeError, load_recipe, names_a_checkpoint, recipe_to_dict, teacher_recipe_of
from gd_hf.curves import plot_curves
from gd_hf.data.batches import build_train_batches
from gd_hf.data.coco import DataError
from gd_hf.data.prepare import RunData, prepare_data
from gd_hf.distributed import build_accelerator, replica_fingerprints
from gd_hf.evaluation import EvalSettings, Evaluation, evaluate_mask_ap, write_results
from gd_hf.files import write_text_atomic
from gd_hf.method import (
    PseudoLabelRule,
    PseudoLabelRules,
    check_extension_points,
    describe_extension,
)
from gd_hf.method.pseudo_labels import PseudoLabels
from gd_hf.method.teacher_check import check_teacher, teacher_check_note
from gd_hf.models import ModelFamily, check_recipe
from gd_hf.phase import Phase, build_phase
from gd_hf.public import public_recipe, run_name
from gd_hf.publish import Publisher
from gd_hf.push import PushError
from gd_hf.run_info import (
    check_relaunch,
    hold_output_locks,
    launches_note,
    read_launches,
    record_launch,
    release_output_locks,
)
from gd_hf.run_log import (
    LogWindow,
    bar_figures,
    drop_log_lines_after,
    format_metrics,
    log_record,
    log_split_sizes,
    read_metrics_log,
    side_by_side,
)
from gd_hf.run_pictures import (
    EXPORT_EXAMPLES,
    jpeg_bytes,
    keep_pseudo_labels,
    png_bytes,
    prediction_picture,
    pseudo_label_picture,
    save_picture,
    val_examples,
)
from gd_hf.step import TrainingError, check_nonfinite_step, train_step
from gd_hf.trackers import build_trackers, chosen_trackers, hyperparameters, log_pictures
from gd_hf.weights import NonFiniteWeightsError, check_finite

logger = logging.getLogger("gd_hf.train")


class TrainingRecipe:
    """One launch of a recipe. `pseudo_label_rule` and `model_family` are the method's extension points (None:
    the recipe's `PseudoLabelRules`, and its `model.family`)."""

    def __init__(
        self, recipe: Recipe, pseudo_label_rule: PseudoLabelRule | None = None,
        model_family: ModelFamily | None = None, trackers: list[GeneralTracker] | None = None,
    ) -> None:  # fmt: skip
        self.launch_recipe = recipe  # what the user asked for: what a relaunch is compared with
        check_extension_points(pseudo_label_rule, model_family, recipe.ssl)  # before any work
        check_recipe(recipe, model_family)  # the model family's keys
        if type(pseudo_label_rule) is PseudoLabelRules and pseudo_label_rule != PseudoLabelRules.from_recipe(
            recipe.ssl
        ):
            raise RecipeError(
                f"pseudo_label_rule={pseudo_label_rule} differs from the recipe's ssl.pseudo_label_* keys: set those "
                "keys instead (the recipe, the checkpoints and the model card then say what was used)"
            )
        unresolved = isinstance(pseudo_label_rule, PseudoLabelRules) and pseudo_label_rule.score_threshold is None
        if (pseudo_label_rule is not None and not unresolved and recipe.ssl.enabled
                and recipe.ssl.pseudo_label_score_threshold == "auto"):  # fmt: skip
            raise RecipeError(
                "ssl.pseudo_label_score_threshold is `auto`, which the teacher check chooses for the recipe's "
                f"pseudo-label rules; the pseudo_label_rule {describe_extension(pseudo_label_rule)} has no score "
                "threshold for it to choose (or a fixed one): give the recipe a number"
            )
        self.pseudo_label_rule = pseudo_label_rule
        self.custom_family = model_family  # None: the recipe's `model.family`, built for each phase
        self.tracker_names = chosen_trackers(recipe.train.report_to)  # a missing package stops before any work
        self.custom_trackers = list(trackers or [])  # Accelerate `GeneralTracker`s beside the recipe's
        self.phase: Phase | None = None  # the phase under way (`set_up` builds it, `end_phase` drops it)

    def run(self, data: RunData | None = None) -> dict[str, float]:
        """Every phase of the recipe in order (resuming where checkpoints are); the final val metrics. `data`:
        already prepared for this recipe's `data` settings (else prepared here: every check happens before
        anything is written)."""
        recipe = self.launch_recipe
        self.accelerator = build_accelerator(recipe)
        # Each phase starts with a fresh fp16 loss scale, as it would on an Accelerator of its own.
        scaler = self.accelerator.scaler
        self.fresh_scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        logging.basicConfig(
            level=logging.INFO if self.accelerator.is_main_process else logging.WARNING,
            format="%(asctime)s %(name)s: %(message)s",
        )
        # Accelerate's INFO lines (a few per checkpoint: "Saving current state to ...") would break the progress
        # bar every checkpoint_every steps; its warnings still show.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
        try:
            data = data if data is not None else prepare_data(recipe, self.accelerator)
            lock_also: tuple[str, ...] = ()
            if recipe.ssl.enabled and recipe.ssl.train_teacher_first:
                recipe = self.train_teacher_first(data)  # phase 1, into output_dir/teacher
                lock_also = (str(Path(recipe.ssl.teacher).parent),)  # the teacher's folder stays as it is
            metrics = self.run_phase(recipe, data, self.launch_recipe, lock_also)
            self.accelerator.end_training()  # the trackers, and the process group
            return metrics
        finally:
            release_output_locks()

    def run_phase(
        self, recipe: Recipe, data: RunData, launch_recipe: Recipe, lock_also: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """One phase: set up (or resume), train to `train.max_steps`, finish. `launch_recipe`: what its
        checkpoints record; `lock_also`: output folders it locks beside its own."""
        self.set_up(recipe, data, launch_recipe, lock_also)
        self.train()
        return self.finish()

    def train_teacher_first(self, data: RunData) -> Recipe:
        """Phase 1 in this launch: the supervised teacher into output_dir/teacher (unless phases 2-3 have begun);
        returns the recipe of phases 2-3, whose `ssl.teacher` is its export."""
        recipe = self.launch_recipe
        teacher_recipe = teacher_recipe_of(recipe)
        if names_a_checkpoint(recipe) or list_checkpoints(Path(recipe.output_dir) / "checkpoints"):
            # Phases 2-3 have begun (their checkpoints hold the teacher they started from): phase 1 is not run
            # again, so a relaunch that extends the run, or of a moved folder, leaves the teacher as it was, and a
            # relaunch that changes what is trained is stopped by the student's comparison before anything is
            # written.
            logger.info("phases 2-3 have begun: phase 1 is done (the teacher: %s)", teacher_recipe.output_dir)
        else:
            try:
                # The launch's own folder is locked from its first write (one launch per folder, phase 1 included).
                self.run_phase(teacher_recipe, data, teacher_recipe, lock_also=(recipe.output_dir,))
            except PushError as e:  # the teacher is trained and saved; only its upload failed: distillation goes on
                logger.error("%s", e)
            self.end_phase()
        best = Path(teacher_recipe.output_dir) / "best"
        teacher = best if best.is_dir() else Path(teacher_recipe.output_dir) / "final"
        return dataclasses.replace(
            recipe, ssl=dataclasses.replace(recipe.ssl, teacher=str(teacher), train_teacher_first=False)
        )

    def end_phase(self) -> None:
        """Phase 1's objects go before phase 2 builds its own (weights, optimizer state, the undo copy: about 6x the
        parameters), phase 1's model and optimizer leave the Accelerator (not part of phase 2's checkpoints), and
        the fp16 loss scale starts afresh."""
        self.phase = None  # the whole phase: nothing of it is kept by name
        self.accelerator.free_memory()  # (and the garbage collector, and the CUDA cache)
        if self.fresh_scaler_state is not None:
            self.accelerator.scaler.load_state_dict(self.fresh_scaler_state)

    def extension_points(self, recipe: Recipe) -> dict[str, str]:
        """The custom extension points this phase trains with (a supervised phase has no pseudo labels), as its
        checkpoints record them (`describe_extension`)."""
        points = {}
        if recipe.ssl.enabled and self.pseudo_label_rule is not None:
            points["pseudo_label_rule"] = describe_extension(self.pseudo_label_rule)
        if self.custom_family is not None:
            points["model_family"] = describe_extension(self.custom_family)
        return points

    # -- set-up -------------------------------------------------------------------------------------------------

    def set_up(self, recipe: Recipe, data: RunData, launch_recipe: Recipe, lock_also: tuple[str, ...]) -> None:
        """The output folder's locks and the resume point; model, method, optimizer and schedule; the batches;
        the resumed state; the output folder's first files."""
        log_split_sizes(recipe, data)
        folders = (recipe.output_dir, *lock_also)
        # A folder that exists is locked now, before its checkpoints are read; a new one before its first write.
        hold_output_locks(self.accelerator, [folder for folder in folders if Path(folder).is_dir()])
        resume_from = find_resume_checkpoint(recipe)
        saved = read_trainer_state(resume_from) if resume_from is not None else None
        changes = {}
        if resume_from is not None:
            changes = check_relaunch(recipe, launch_recipe, saved, resume_from, self.extension_points(recipe))
        self.phase = build_phase(self.accelerator, recipe, data, launch_recipe, self.custom_family,
                                 self.pseudo_label_rule)  # fmt: skip
        self.phase.state = RunState.from_dict(saved) if saved is not None else RunState()
        teacher_figures, auto = None, recipe.ssl.pseudo_label_score_threshold == "auto"
        if self.phase.method.teacher is not None and recipe.ssl.teacher is not None and (resume_from is None or auto):
            # Can this teacher teach? Measured before anything is written (a stop leaves only the teacher); a
            # resumed run checked it at its start and does not again, unless the check chooses its threshold.
            teacher_figures = check_teacher(self.phase.method.teacher.model, data.val, recipe, self.phase.padding_divisor,
                                            self.accelerator.is_main_process, self.phase.method.rule, self.phase.family)  # fmt: skip
        threshold_changed = False
        if auto and teacher_figures is not None:
            teacher_figures = self.same_on_every_process(teacher_figures)
            threshold_change = self.use_chosen_threshold(teacher_figures["score_threshold"], resume_from)
            changes.update(threshold_change)
            threshold_changed = bool(threshold_change)
        rank = self.accelerator.process_index
        stream_states = read_data_state(resume_from, rank) if resume_from is not None else None
        self.phase.batches = build_train_batches(recipe, data, self.accelerator.process_index,
                                           self.accelerator.num_processes, self.phase.padding_divisor, self.phase.state.step,
                                           stream_states, self.phase.family.black_padding)  # fmt: skip
        if resume_from is not None:  # model, optimizer, schedule, teacher and RNG as after the checkpoint's step
            load_checkpoint(self.accelerator, resume_from, self.checkpointed_states())
        hold_output_locks(self.accelerator, folders)
        self.write_run_files(self.phase.state.step, resume_from is not None, changes)
        # A resume re-measures for `auto` only to compare: logged again only when it changed the threshold.
        self.set_up_publisher(teacher_figures, log_teacher_check=resume_from is None or threshold_changed)
        self.phase.log, self.phase.skipped_since_checkpoint, self.phase.metrics = LogWindow(), 0, {}

    def same_on_every_process(self, figures: dict[str, float]) -> dict[str, float]:
        """The main process's teacher-check figures on every process: each measures, and float sums on different
        devices could put one on the other side of a threshold; the threshold must be one."""
        if self.accelerator.num_processes == 1:
            return figures
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([figures])[0]

    def use_chosen_threshold(self, threshold: float, resume_from: Path | None) -> dict[str, list[Any]]:
        """`ssl.pseudo_label_score_threshold: auto`: the method's rule, the run state (every checkpoint records
        it) and the card take the teacher check's choice. A resumed run that would now choose another (its teacher
        or val images changed) is a change to what is trained: it stops unless `resume: force`. Returns the
        change for the launch record ({} when none)."""
        recorded, changes = self.phase.state.pseudo_label_score_threshold, {}
        if resume_from is not None and recorded != threshold:
            key = "ssl.pseudo_label_score_threshold (auto)"
            was = "not recorded" if recorded is None else f"{recorded:g}"
            if self.phase.recipe.resume != "force":
                raise RecipeError(
                    f"this relaunch changes what the run in {self.phase.recipe.output_dir} trained (checkpoint "
                    f"{resume_from.name}): ssl.pseudo_label_score_threshold=auto chose {was} at the run's start "
                    f"and the teacher check now chooses {threshold:g} (the teacher or the val images changed). "
                    "Start a new run (another output_dir), or relaunch with resume=force to go on with "
                    f"{threshold:g} (the change is recorded in run_info.json and the model card)."
                )
            logger.warning("resume=force: going on from %s with the score threshold %g (was %s)", resume_from,
                           threshold, was)  # fmt: skip
            changes[key] = [recorded, threshold]
        elif resume_from is not None:
            logger.info("ssl.pseudo_label_score_threshold=auto: %g, as chosen at the run's start", threshold)
        self.phase.state.pseudo_label_score_threshold = threshold
        self.phase.method.rule = self.phase.method.rule.with_score_threshold(threshold)
        ssl = dataclasses.replace(self.phase.recipe.ssl, pseudo_label_score_threshold=threshold)
        self.phase.recipe = dataclasses.replace(self.phase.recipe, ssl=ssl)  # what the card says was used
        return changes

    def write_run_files(self, step: int, resumed: bool, changes: dict[str, list[Any]]) -> None:
        """The resolved recipe as launched (what relaunching it compares with), this launch's record (versions,
        commit, command, its recipe and what it changed), a metrics log without the lines of steps a resume
        repeats; the trackers, logging into this phase's folder."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.phase.output_dir.mkdir(parents=True, exist_ok=True)
            resolved = recipe_to_dict(self.phase.recorded_recipe)
            write_text_atomic(self.phase.output_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
            record_launch(self.phase.output_dir, accelerator.num_processes, accelerator.mixed_precision, resolved,
                          step if resumed else None, changes)  # fmt: skip
            drop_log_lines_after(self.phase.output_dir / "metrics.jsonl", step)
        # One Accelerator runs every phase: each phase has trackers of its own, writing into its own output folder,
        # with the recipe (paths made public) as hyperparameters.
        accelerator.project_configuration.project_dir = str(self.phase.output_dir)
        accelerator.project_configuration.logging_dir = str(self.phase.output_dir)
        if accelerator.is_main_process:
            name = run_name(self.phase.recipe)
            accelerator.log_with = (
                build_trackers(self.tracker_names, name, self.phase.output_dir) + self.custom_trackers
            )
            accelerator.init_trackers(name, config=hyperparameters(public_recipe(self.phase.recorded_recipe)))

    def set_up_publisher(self, teacher_figures: dict[str, float] | None, log_teacher_check: bool = True) -> None:
        """Exports and pushes, with the card's notes: the launches of the run, the teacher check's figures (logged
        to metrics.jsonl at a run's start; a resume's repeated check only reaches the card)."""
        recipe, data = self.phase.recipe, self.phase.data
        self.phase.publisher = Publisher.for_run(recipe, self.phase.image_processor, len(data.split.labeled),
                                           len(data.split.unlabeled), len(data.val), data.categories.names,
                                           self.phase.recorded_recipe, self.phase.family)  # fmt: skip
        if self.accelerator.is_main_process:  # the val images of the pictures, and the export's examples
            self.phase.picture_examples = val_examples(data.val, max(self.phase.recipe.eval.pictures, EXPORT_EXAMPLES))
            self.phase.publisher.examples = {f"val_{image_id}.jpg": jpeg_bytes(image)
                                       for image_id, image in self.phase.picture_examples[:EXPORT_EXAMPLES]}  # fmt: skip
        note = launches_note(read_launches(recipe.output_dir)) if self.accelerator.is_main_process else None
        if note:
            self.phase.publisher.notes.append(note)
        custom = self.extension_points(recipe)
        if custom:  # not in the recipe: the card names their classes (settings may hold this machine's paths)
            points = "; ".join(f"{name} = {value.partition('(')[0]}" for name, value in custom.items())
            self.phase.publisher.notes.append(
                f"Trained with extension points passed from Python (not in the recipe): {points}."
            )
        if teacher_figures is not None and log_teacher_check:
            log_record(self.accelerator, self.phase.output_dir / "metrics.jsonl",
                       {"step": self.phase.state.step, **{f"teacher_check/{k}": v for k, v in teacher_figures.items()}})  # fmt: skip
        if teacher_figures is not None:
            self.phase.publisher.notes.append(teacher_check_note(teacher_figures))

    # -- the loop -----------------------------------------------------------------------------------------------

    def train(self) -> None:
        """The loop: the method's step, then logging, evaluation and checkpoints, to `train.max_steps`."""
        cfg, state = self.phase.recipe.train, self.phase.state
        progress = tqdm(total=cfg.max_steps, initial=state.step, desc=self.phase_label(state.step), dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)  # fmt: skip
        with logging_redirect_tqdm():  # the run's log lines print above the bar, not through it
            self.run_steps(progress)
        progress.close()
        self.phase.batches = None  # ends the loaders' workers

    def phase_label(self, step: int) -> str:
        """What the bar calls the phase of `step`: `teacher` (phase 1 of a Guided Distillation run),
        `supervised` (a plain run), `burn-in`, `EMA`."""
        phase = self.phase.method.phase(step)
        if phase == "supervised":
            return "teacher" if self.launch_recipe.ssl.enabled else "supervised"
        return {"burn_in": "burn-in", "ema": "EMA"}[phase]

    def due(self, every: int, step: int) -> bool:
        """Whether periodic work done every `every` steps (0: never) is due after `step` steps: also the last."""
        return bool(every and step % every == 0) or step == self.phase.recipe.train.max_steps

    def run_steps(self, progress: tqdm) -> None:
        phase = self.phase
        cfg, method, state = phase.recipe.train, phase.method, phase.state
        # The periodic work after a step, in this order: each `work()` when due (every N steps, and the last).
        periodic = [(cfg.log_every, self.write_log_line), (cfg.eval_every, self.evaluate_and_export_best),
                    (cfg.checkpoint_every, self.save_checkpoint)]  # fmt: skip
        phase.model.train()
        while state.step < cfg.max_steps:
            progress.set_description(self.phase_label(state.step), refresh=False)
            start = method.start_step(state.step, phase.student)  # at burn-in's end: teacher <- student
            if start.burn_in_ended and self.accelerator.is_main_process:
                phase.publisher.push_burn_in_student(phase.student, state.step)
            labeled, unlabeled = phase.batches.next_step(cfg.gradient_accumulation_steps)
            # The student's step: labeled images, plus the strong views with the teacher's pseudo labels of the weak.
            uses_pseudo_labels = method.uses_pseudo_labels(state.step)
            observe = None
            if uses_pseudo_labels and phase.recipe.eval.pictures and self.due(cfg.eval_every, state.step + 1):
                observe = self.keep_for_picture(state.step)  # what the student is taught, for the evaluation's picture
            outcome = train_step(phase.model, labeled, phase.optimizer, phase.scheduler, self.accelerator,
                                 cfg.grad_clip, method, unlabeled if uses_pseudo_labels else None, phase.undo,
                                 observe, start.scheduled)  # fmt: skip
            # A non-finite step never reaches the teacher or disk; too many in a row stop the run.
            update_skipped = check_nonfinite_step(outcome, state, cfg, phase.output_dir / "checkpoints")
            method.after_step(state.step, phase.student, update_skipped)  # EMA: the teacher follows the student
            state.step += 1
            phase.skipped_since_checkpoint += sum(b["skipped"] for b in labeled + (unlabeled or []))
            phase.log.add(outcome.logged)
            progress.update(1)
            progress.set_postfix(bar_figures(outcome.logged), refresh=False)
            for every, work in periodic:
                if self.due(every, state.step):
                    work()

    def keep_for_picture(self, step: int) -> Callable[[dict[str, Any], PseudoLabels], None]:
        """What `train_step`'s loss calls with the unlabeled batch and its pseudo labels: the first images of them
        kept for the next evaluation's picture."""

        def keep(unlabeled: dict[str, Any], pseudo: PseudoLabels) -> None:
            self.phase.kept_pseudo_labels = keep_pseudo_labels(step, unlabeled, pseudo, self.phase.recipe.eval.pictures)

        return keep

    def write_log_line(self) -> None:
        """One metrics.jsonl line (rank 0 writes it): the window's means over all processes, the counts so far,
        speed, memory, and, after a launch's first step, its start-up time."""
        accelerator = self.accelerator
        # Bad records skipped so far (data.on_error: skip), over all processes.
        skipped = accelerator.reduce(
            torch.tensor(self.phase.skipped_since_checkpoint, device=accelerator.device), "sum"
        )
        counts = {"nonfinite_steps": self.phase.state.nonfinite_steps, "data_skipped": self.phase.state.data_skipped + skipped.item(),
                  "step": self.phase.state.step, "lr": self.phase.scheduler.get_last_lr()[-1]}  # fmt: skip
        log_record(accelerator, self.phase.output_dir / "metrics.jsonl", self.phase.log.record(accelerator, counts))
        self.phase.log = LogWindow(first_of_launch=False)

    # -- evaluation, checkpoints, the end ---------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        """Mask AP of `model` on the val split (`eval.max_images` of it): each process predicts its share."""
        recipe, data, accelerator = self.phase.recipe, self.phase.data, self.accelerator
        val = data.val if recipe.eval.max_images is None else data.val.select(
            range(min(recipe.eval.max_images, len(data.val))))  # fmt: skip
        settings = EvalSettings(recipe.data, self.phase.padding_divisor, recipe.eval.top_k, recipe.eval.batch_size,
                                min(recipe.data.num_workers, 2), accelerator.is_local_main_process, self.phase.family)  # fmt: skip
        return evaluate_mask_ap(model, val, data.val_ground_truth, data.categories.ids, settings, accelerator.device,
                                accelerator.process_index, accelerator.num_processes,
                                gather_object if accelerator.num_processes > 1 else None)  # fmt: skip

    def evaluate_and_export_best(self) -> None:
        """Val mask AP of the evaluated model (and of the teacher with `ssl.evaluate: both`); a new best is
        exported to `best/`. Rank 0 decides the best; every rank learns it for the next checkpoint."""
        accelerator, step, state = self.accelerator, self.phase.state.step, self.phase.state
        evaluation = self.evaluate(self.phase.evaluated)
        metrics = evaluation.metrics
        logged = {f"val/{k}": v for k, v in metrics.items()}
        logged.update({f"eval/{k}": v for k, v in evaluation.costs.items()})
        if self.phase.method.teacher is not None and self.phase.recipe.ssl.evaluate == "both":
            teacher_metrics = self.evaluate(self.phase.method.teacher.model).metrics
            logged.update({f"val_teacher/{k}": v for k, v in teacher_metrics.items()})
        self.phase.metrics = metrics
        if accelerator.is_main_process:
            write_results(self.phase.output_dir / "predictions" / f"val_step_{step:08d}.json", evaluation.results)
            log_record(accelerator, self.phase.output_dir / "metrics.jsonl", {"step": step, **logged})
            self.draw_pictures(evaluation, step)
            logger.info("step %d val mask AP %.2f (AP50 %.2f, AP75 %.2f)", step, metrics["AP"], metrics["AP50"],
                        metrics["AP75"])  # fmt: skip
            if metrics["AP"] > state.best_ap:
                state.best_ap, state.best_step = metrics["AP"], step
                self.draw_curves()
                self.phase.publisher.export(self.phase.evaluated, "best", step, metrics)
        if accelerator.num_processes > 1:  # rank 0 decided; the rest of the state is alike on every rank
            state.best_ap, state.best_step = broadcast_object_list([(state.best_ap, state.best_step)])[0]

    def draw_pictures(self, evaluation: Evaluation, step: int) -> None:
        """Rank 0, after an evaluation: the val predictions beside their truth and the pseudo labels the student
        was just taught, into `OUTPUT/pictures/` and the trackers that take images; the predictions also go
        into the next export. A picture that cannot be drawn or written is a warning, never the run's end."""
        try:
            self._draw_pictures(evaluation, step)
        except Exception as e:  # noqa: BLE001 - pictures are for people: a failure must not cost the run
            logger.warning("step %d: the evaluation's pictures were not drawn (%s: %s)", step, type(e).__name__, e)

    def _draw_pictures(self, evaluation: Evaluation, step: int) -> None:
        count, data = self.phase.recipe.eval.pictures, self.phase.data
        if not count:
            return
        pictures = {}
        evaluated = self.phase.picture_examples[
            : min(count, len(data.val), self.phase.recipe.eval.max_images or len(data.val))
        ]
        pictures["val/predictions"] = prediction_picture(evaluated, evaluation.results, data.val_ground_truth,
                                                         data.categories.ids, data.categories.names, step)  # fmt: skip
        png = png_bytes(pictures["val/predictions"])  # encoded once: the folder's picture and the export's
        save_picture(png, self.phase.output_dir / "pictures" / f"val_step_{step:08d}.png")
        self.phase.publisher.pictures["predictions.png"] = png
        kept, self.phase.kept_pseudo_labels = self.phase.kept_pseudo_labels, None
        if kept is not None:
            pictures["pseudo/labels"] = pseudo_label_picture(kept, data.categories.names)
            save_picture(png_bytes(pictures["pseudo/labels"]),
                         self.phase.output_dir / "pictures" / f"pseudo_labels_step_{kept.step:08d}.png")  # fmt: skip
        log_pictures(self.accelerator.trackers, pictures, step)

    def draw_curves(self) -> None:
        """Rank 0: `OUTPUT/curves.png` from the metrics log so far (phases marked); the next export shows it. A
        failure is a warning (the export goes without the curves)."""
        try:
            self._draw_curves()
        except Exception as e:  # noqa: BLE001 - as draw_pictures
            logger.warning("curves.png was not drawn (%s: %s)", type(e).__name__, e)

    def _draw_curves(self) -> None:
        records = read_metrics_log(self.phase.output_dir / "metrics.jsonl")
        names = {"burn_in": "guided burn-in", "ema": "EMA distillation"}  # (supervised: as the bar calls it)
        phases = [(step, names.get(phase) or self.phase_label(step))
                  for step, phase in self.phase.method.phase_starts(self.phase.recipe.train.max_steps)]  # fmt: skip
        title = run_name(self.phase.recipe).replace("$", r"\$")  # matplotlib reads $...$ as mathematics
        path = plot_curves(records, self.phase.output_dir / "curves.png", phases, title=title)
        if path is not None:
            self.phase.publisher.pictures["curves.png"] = path.read_bytes()

    def save_checkpoint(self) -> None:
        """A checkpoint of the run: weights, optimizer, schedule, RNG, the EMA teacher, `state` (with the bad
        records of every process added up), each process's stream positions and, on several processes, the
        replicas' checksums."""
        accelerator, state, teacher = self.accelerator, self.phase.state, self.phase.method.teacher
        skipped = accelerator.reduce(
            torch.tensor(self.phase.skipped_since_checkpoint, device=accelerator.device), "sum"
        )
        state.data_skipped, self.phase.skipped_since_checkpoint = state.data_skipped + skipped.item(), 0
        if accelerator.num_processes > 1:
            state.replica_fingerprints = replica_fingerprints(accelerator, self.phase.student, teacher)
        check_finite(self.phase.student, "the student")  # a checkpoint is always one a run can go on from
        if teacher is not None:
            check_finite(teacher.model, "the teacher")
        # The checkpoint names the recipe that trained it: a relaunch compares its own with it.
        trainer_state = {**state.to_dict(), "num_processes": accelerator.num_processes,
                         "recipe": recipe_to_dict(self.phase.recorded_recipe)}  # fmt: skip
        extension_points = self.extension_points(self.phase.recipe)
        if extension_points:  # custom ones only: a run of the recipe's own records nothing here
            trainer_state["extension_points"] = extension_points
        save_checkpoint(accelerator, self.phase.output_dir / "checkpoints", state.step, trainer_state,
                        self.phase.recipe.train.keep_checkpoints, self.phase.batches.data_state(),
                        self.checkpointed_states())  # fmt: skip

    def checkpointed_states(self) -> list[Any]:
        """What a checkpoint keeps beside the model, optimizer and RNG: the schedule, and the EMA teacher (part of
        the run's state in phases 2-3), in this order."""
        return [self.phase.scheduler] + ([self.phase.method.teacher] if self.phase.method.teacher is not None else [])

    def finish(self) -> dict[str, float]:
        """The final export (also when the run was already complete and only resumed to this point), its
        metrics, and the final push; the phase's trackers end."""
        accelerator, recipe, state = self.accelerator, self.phase.recipe, self.phase.state
        metrics = self.phase.metrics
        if not metrics:  # a relaunch of a run whose last step was checkpointed but not exported
            evaluation = self.evaluate(self.phase.evaluated)
            metrics = evaluation.metrics
            if accelerator.is_main_process:
                self.draw_pictures(evaluation, state.step)
        if accelerator.is_main_process:
            self.draw_curves()
            hub = recipe.hub  # a card pushed to a branch loads that branch
            model_id = (hub.repo_id + (f"@{hub.revision}" if hub.revision else "")) if hub.push else None
            final = self.phase.publisher.export(self.phase.evaluated, "final", state.step, metrics, model_id)
            final_summary = {"final": metrics, "best_ap": state.best_ap, "best_step": state.best_step}
            write_text_atomic(self.phase.output_dir / "final_metrics.json", json.dumps(final_summary, indent=2))
            print(format_metrics(metrics, state.step), flush=True)
            if self.phase.publisher.teacher_metrics is not None:
                print(side_by_side(self.phase.publisher.teacher_metrics, metrics), flush=True)
            if recipe.hub.push:
                message = f"Model after {state.step} steps (mask AP {metrics['AP']:.2f})"
                if self.phase.publisher.push(final, recipe.hub.revision, message) and recipe.hub.space_repo:
                    self.phase.publisher.push_space(final)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()  # the next phase starts its own
        self.phase.publisher.raise_failures()
        return metrics


def train(
    recipe: Recipe, data: RunData | None = None, pseudo_label_rule: PseudoLabelRule | None = None,
    model_family: ModelFamily | None = None, trackers: list[GeneralTracker] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Run a recipe to its end (resuming where it has checkpoints); the final val metrics. See `TrainingRecipe`;
    `trackers`: Accelerate trackers of your own, beside `train.report_to`'s."""
    return TrainingRecipe(recipe, pseudo_label_rule, model_family, trackers).run(data)


# Exit codes of `python -m gd_hf.train`, and the words of the last console line for each.
EXIT_OUTCOMES = {
    0: "done",
    1: "failed: an unexpected error (the traceback is above; please report it)",
    2: "stopped: a bad recipe, data or output folder (the message above names it)",
    3: "trained and saved, but the Hub push failed (the command above pushes again)",
    4: "stopped: training became non-finite (the message above names the last good checkpoint)",
    130: "interrupted",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gd_hf.train", description="Train a recipe (see recipes/*.yaml).")
    parser.add_argument("recipe", help="path of a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    code = run_main(args.recipe, args.overrides)
    print(f"gd_hf.train: {EXIT_OUTCOMES[code]} (exit code {code})", file=sys.stderr, flush=True)
    return code


def run_main(recipe_path: str, overrides: list[str]) -> int:
    """Load and train a recipe; the exit code of the outcome (see `EXIT_OUTCOMES`)."""
    try:
        recipe = load_recipe(recipe_path, overrides)
        try:
            train(recipe)
        finally:
            PartialState().destroy_process_group()
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, NonFiniteWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except PushError as e:  # training finished and its outputs are saved; only the upload failed
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
