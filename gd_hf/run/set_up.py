"""A phase's set-up (`set_up_phase`): the output folder's locks and the resume point, the phase's objects
(`build_phase`), the teacher check, the batches, the resumed state, the output folder's first files, the trackers
and the publisher. What it returns is the whole phase: nothing of it is kept elsewhere."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from gd_hf.config import Recipe, RecipeError, recipe_to_dict, short_run_warnings
from gd_hf.data.batches import build_train_batches
from gd_hf.data.prepare import RunData
from gd_hf.files import write_text_atomic
from gd_hf.hub.public import public_recipe, run_name
from gd_hf.method import PseudoLabelRule, describe_extension
from gd_hf.method.teacher_check import check_teacher, teacher_check_note
from gd_hf.models import ModelFamily
from gd_hf.run.checkpointing import (
    RunState,
    find_resume_checkpoint,
    load_checkpoint,
    read_data_state,
    read_trainer_state,
)
from gd_hf.run.eval_pictures import EXPORT_EXAMPLES, jpeg_bytes, val_examples
from gd_hf.run.launches import (
    check_relaunch,
    hold_output_locks,
    launches_note,
    read_launches,
    record_launch,
    tidy_after_a_stopped_launch,
)
from gd_hf.run.metrics_log import LogWindow, drop_log_lines_after, log_record, log_split_sizes
from gd_hf.run.phase import Phase, build_phase
from gd_hf.run.publisher import Publisher
from gd_hf.run.trackers import build_trackers, hyperparameters

logger = logging.getLogger("gd_hf.train")


@dataclass
class LaunchOptions:
    """What a launch adds to each phase's recipe: the extension points passed from Python (None: the recipe's
    pseudo-label rules, its `model.family`), the trackers, and what the bar calls a supervised phase."""

    pseudo_label_rule: PseudoLabelRule | None = None
    model_family: ModelFamily | None = None
    tracker_names: list[str] = field(default_factory=list)  # `train.report_to`'s
    custom_trackers: list[GeneralTracker] = field(default_factory=list)  # Accelerate trackers beside them
    supervised_label: str = "supervised"

    def extension_points(self, recipe: Recipe) -> dict[str, str]:
        """The custom extension points a phase of `recipe` trains with (a supervised phase has no pseudo labels),
        as its checkpoints record them (`describe_extension`)."""
        points = {}
        if recipe.ssl.enabled and self.pseudo_label_rule is not None:
            points["pseudo_label_rule"] = describe_extension(self.pseudo_label_rule)
        if self.model_family is not None:
            points["model_family"] = describe_extension(self.model_family)
        return points


def set_up_phase(
    accelerator: Accelerator, recipe: Recipe, data: RunData, launch_recipe: Recipe, lock_also: tuple[str, ...],
    options: LaunchOptions,
) -> Phase:  # fmt: skip
    """The output folder's locks and the resume point; model, method, optimizer and schedule; the batches; the
    resumed state; the output folder's first files. `launch_recipe`: what the phase's checkpoints record;
    `lock_also`: output folders it locks beside its own."""
    log_split_sizes(recipe, data)
    teacher_phase = not recipe.ssl.enabled and options.supervised_label == "teacher" and recipe.ssl.teacher_max_steps
    short_run = short_run_warnings(recipe, "ssl.teacher_max_steps" if teacher_phase else "train.max_steps")
    for warning in short_run:  # a smoke test is short on purpose; a real run that is must not be silent
        logger.warning("%s", warning)
    folders = (recipe.output_dir, *lock_also)
    # A folder that exists is locked now, before its checkpoints are read; a new one before its first write.
    hold_output_locks(accelerator, [folder for folder in folders if Path(folder).is_dir()])
    resume_from = find_resume_checkpoint(recipe)
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    extension_points = options.extension_points(recipe)
    changes = {}
    if resume_from is not None:
        changes = check_relaunch(recipe, launch_recipe, saved, resume_from, extension_points, data.fingerprint)
    phase = build_phase(accelerator, recipe, data, launch_recipe, options.model_family, options.pseudo_label_rule)
    data.finish_val_check()  # (begun by `prepare_data` while the model was built; before anything is written)
    phase.extension_points, phase.supervised_label = extension_points, options.supervised_label
    phase.state = RunState.from_dict(saved) if saved is not None else RunState()
    teacher_figures, auto = None, recipe.ssl.pseudo_label_score_threshold == "auto"
    if phase.method.teacher is not None and recipe.ssl.teacher is not None and (resume_from is None or auto):
        # Can this teacher teach? Measured before anything is written (a stop leaves only the teacher); a resumed
        # run checked it at its start and does not again, unless the check chooses its threshold.
        teacher_figures = check_teacher(phase.method.teacher.model, data.val, recipe, phase.padding_divisor,
                                        accelerator.is_main_process, phase.method.rule, phase.family)  # fmt: skip
    threshold_changed = False
    if auto and teacher_figures is not None:
        teacher_figures = same_on_every_process(accelerator, teacher_figures)
        threshold_change = use_chosen_threshold(phase, teacher_figures["score_threshold"], resume_from)
        changes.update(threshold_change)
        threshold_changed = bool(threshold_change)
    stream_states = read_data_state(resume_from, accelerator.process_index) if resume_from is not None else None
    phase.batches = build_train_batches(recipe, data, accelerator.process_index, accelerator.num_processes,
                                        phase.padding_divisor, phase.state.step, stream_states,
                                        phase.family.black_padding)  # fmt: skip
    if resume_from is not None:  # model, optimizer, schedule, teacher and RNG as after the checkpoint's step
        load_checkpoint(accelerator, resume_from, phase.checkpointed_states())
    hold_output_locks(accelerator, folders)
    if accelerator.is_main_process:
        for line in tidy_after_a_stopped_launch(phase.output_dir):
            logger.warning("%s: %s", phase.output_dir, line)
    write_run_files(phase, resume_from is not None, changes, options)
    # A resume re-measures for `auto` only to compare: logged again only when it changed the threshold.
    set_up_publisher(phase, teacher_figures, log_teacher_check=resume_from is None or threshold_changed)
    if short_run:  # the card says why its figures may be low
        phase.publisher.notes.append("A short run: " + "; ".join(short_run) + ".")
    phase.log, phase.skipped_since_checkpoint, phase.metrics = LogWindow(), 0, {}
    return phase


def same_on_every_process(accelerator: Accelerator, figures: dict[str, float]) -> dict[str, float]:
    """The main process's teacher-check figures on every process: each measures, and float sums on different
    devices could put one on the other side of a threshold; the threshold must be one."""
    if accelerator.num_processes == 1:
        return figures
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([figures])[0]


def use_chosen_threshold(phase: Phase, threshold: float, resume_from: Path | None) -> dict[str, list[Any]]:
    """`ssl.pseudo_label_score_threshold: auto`: the method's rule, the run state (every checkpoint records it)
    and the card take the teacher check's choice. A resumed run that would now choose another (its teacher or val
    images changed) is a change to what is trained: it stops unless `resume: force`. Returns the change for the
    launch record ({} when none)."""
    recorded, changes = phase.state.pseudo_label_score_threshold, {}
    if resume_from is not None and recorded != threshold:
        key = "ssl.pseudo_label_score_threshold (auto)"
        was = "not recorded" if recorded is None else f"{recorded:g}"
        if phase.recipe.resume != "force":
            raise RecipeError(
                f"this relaunch changes what the run in {phase.recipe.output_dir} trained (checkpoint "
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
    phase.state.pseudo_label_score_threshold = threshold
    phase.method.rule = phase.method.rule.with_score_threshold(threshold)
    ssl = dataclasses.replace(phase.recipe.ssl, pseudo_label_score_threshold=threshold)
    phase.recipe = dataclasses.replace(phase.recipe, ssl=ssl)  # what the card says was used
    return changes


def write_run_files(phase: Phase, resumed: bool, changes: dict[str, list[Any]], options: LaunchOptions) -> None:
    """The resolved recipe as launched (what relaunching it compares with), this launch's record (versions,
    commit, command, its recipe and what it changed), a metrics log without the lines of steps a resume
    repeats; the trackers, logging into this phase's folder."""
    accelerator, step = phase.accelerator, phase.state.step
    if accelerator.is_main_process:
        phase.output_dir.mkdir(parents=True, exist_ok=True)
        resolved = recipe_to_dict(phase.recorded_recipe)
        write_text_atomic(phase.output_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        record_launch(phase.output_dir, accelerator.num_processes, accelerator.mixed_precision, resolved,
                      step if resumed else None, changes)  # fmt: skip
        drop_log_lines_after(phase.output_dir / "metrics.jsonl", step)
    # One Accelerator runs every phase: each phase has trackers of its own, writing into its own output folder,
    # with the recipe (paths made public) as hyperparameters.
    accelerator.project_configuration.project_dir = str(phase.output_dir)
    accelerator.project_configuration.logging_dir = str(phase.output_dir)
    if accelerator.is_main_process:
        name = run_name(phase.recipe)
        accelerator.log_with = build_trackers(options.tracker_names, name, phase.output_dir) + options.custom_trackers
        accelerator.init_trackers(name, config=hyperparameters(public_recipe(phase.recorded_recipe)))


def set_up_publisher(phase: Phase, teacher_figures: dict[str, float] | None, log_teacher_check: bool = True) -> None:
    """Exports and pushes, with the card's notes: the launches of the run, the teacher check's figures (logged
    to metrics.jsonl at a run's start; a resume's repeated check only reaches the card)."""
    recipe, data, main_process = phase.recipe, phase.data, phase.accelerator.is_main_process
    phase.publisher = Publisher.for_run(recipe, phase.image_processor, len(data.split.labeled),
                                        len(data.split.unlabeled), len(data.val), data.categories.names,
                                        phase.recorded_recipe, phase.family)  # fmt: skip
    if main_process:  # the val images of the pictures, and the export's examples
        # (candidates for the export's examples too: `choose_examples` keeps those the model finds most in)
        phase.picture_examples = val_examples(data.val, max(recipe.eval.pictures, 4 * EXPORT_EXAMPLES))
        phase.publisher.examples = {f"val_{image_id}.jpg": jpeg_bytes(image)
                                    for image_id, image in phase.picture_examples[:EXPORT_EXAMPLES]}  # fmt: skip
    note = launches_note(read_launches(recipe.output_dir)) if main_process else None
    if note:
        phase.publisher.notes.append(note)
    if (
        phase.extension_points
    ):  # not in the recipe: the card names their classes (settings may hold this machine's paths)
        points = "; ".join(f"{name} = {value.partition('(')[0]}" for name, value in phase.extension_points.items())
        phase.publisher.notes.append(f"Trained with extension points passed from Python (not in the recipe): {points}.")
    if teacher_figures is not None and log_teacher_check:
        log_record(phase.accelerator, phase.output_dir / "metrics.jsonl",
                   {"step": phase.state.step, **{f"teacher_check/{k}": v for k, v in teacher_figures.items()}})  # fmt: skip
    if teacher_figures is not None:
        phase.publisher.notes.append(teacher_check_note(teacher_figures))
