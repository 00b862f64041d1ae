"""The training recipe: `accelerate launch -m gd_hf.train recipes/NAME.yaml [key=value ...]`.

`train()` reads top to bottom: the data, the set-up (`set_up`: model, teacher, optimizer, batches, resume), the
loop (the phase of the step, the copy at the end of burn-in, the student's step, the EMA update, then logging,
evaluation and checkpoints as named calls) and the end (`finish`: final export and push). Phase 1 of Guided
Distillation is the same loop without a teacher (supervised training on the labeled split).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import Mask2FormerForUniversalSegmentation

from gd_hf.checkpointing import (
    RunState,
    checkpoint_problem,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from gd_hf.config import Recipe, RecipeError, SslConfig, load_recipe, recipe_to_dict
from gd_hf.data.batches import TrainBatches, build_train_batches
from gd_hf.data.coco import DataError
from gd_hf.data.loading import EvalDataset, collate_eval, frame_size, pad_batch
from gd_hf.data.prepare import RunData, prepare_data
from gd_hf.evaluation import coco_mask_ap, predict_coco_results, write_results
from gd_hf.files import write_text_atomic
from gd_hf.modeling import (
    NonFiniteWeightsError,
    all_finite,
    build_image_processor,
    build_model,
    check_finite,
    loss_terms,
    size_divisibility,
)
from gd_hf.optim import UpdateUndo, build_lr_scheduler, build_optimizer
from gd_hf.pseudo_labels import filter_pseudo_labels, pseudo_label_quality
from gd_hf.publish import Publisher
from gd_hf.push import PushError
from gd_hf.run_info import (
    changes_what_is_trained,
    check_output_folder,
    describe_changes,
    launches_note,
    lock_output_folder,
    read_launches,
    recipe_changes,
    record_launch,
    release_output_locks,
    run_storage_bytes,
)
from gd_hf.teacher import EmaTeacher
from gd_hf.teacher_check import check_teacher, teacher_check_note

logger = logging.getLogger("gd_hf.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what is kept and what to try."""


def find_resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from according to `recipe.resume` (see `Recipe.resume`): with `auto`/`force`
    the newest one that reads whole, passing over (and naming) damaged newer ones."""
    checkpoint_dir = Path(recipe.output_dir) / "checkpoints"
    complete = list_checkpoints(checkpoint_dir)
    extra_states = 2 if recipe.ssl.enabled else 1  # the schedule, and the EMA teacher (`checkpointed_states`)
    if recipe.resume == "none":
        if complete:
            raise RecipeError(
                f"resume: none, but {checkpoint_dir} already holds checkpoints: set resume: auto to continue, "
                "or choose another output_dir"
            )
        return None
    if recipe.resume in ("auto", "force"):
        partial_ones = sorted(p.name for p in checkpoint_dir.glob(".tmp_step_*")) if checkpoint_dir.is_dir() else []
        if partial_ones:
            logger.warning(
                "ignoring partial checkpoint(s) %s in %s (a run stopped while writing)", partial_ones, checkpoint_dir
            )
        problems = []
        for checkpoint in reversed(complete):
            problem = checkpoint_problem(checkpoint, extra_states)
            if problem is None:
                if problems:
                    logger.warning("resuming from %s, the newest checkpoint that reads whole", checkpoint)
                return checkpoint
            logger.warning("checkpoint %s cannot be resumed from: %s", checkpoint, problem)
            problems.append(f"{checkpoint.name}: {problem}")
        if problems:
            raise RecipeError(
                f"no checkpoint in {checkpoint_dir} can be resumed from ({'; '.join(problems)}): move them away to "
                "start afresh, or choose another output_dir"
            )
        return None
    path = Path(recipe.resume)
    if not path.is_dir():
        raise RecipeError(
            f"resume: {recipe.resume} is neither 'auto', 'none', 'force' nor an existing checkpoint folder"
        )
    problem = checkpoint_problem(path, extra_states)
    if problem is not None:
        raise RecipeError(f"resume: {path} cannot be resumed from: {problem}")
    return path


def names_a_checkpoint(recipe: Recipe) -> bool:
    """Whether `recipe.resume` is a checkpoint folder rather than one of the modes `auto`, `none`, `force`."""
    return recipe.resume not in ("auto", "none", "force")


def build_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerator with mixed precision from the recipe (or the accelerate config) and TensorBoard if installed."""
    kwargs: dict[str, Any] = {
        # Some backbone parameters get no gradient (Swin's last norm, DINOv2's mask token): DDP must allow that.
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
        "project_dir": recipe.output_dir,
        # Without a GPU, `accelerate launch --multi_gpu` gives real gloo DDP only with cpu=True (hf-notes).
        "cpu": not torch.cuda.is_available(),
    }
    if recipe.train.mixed_precision is not None:
        kwargs["mixed_precision"] = recipe.train.mixed_precision
    try:
        import tensorboard  # noqa: F401

        kwargs["log_with"] = "tensorboard"
    except ImportError:
        pass
    accelerator = Accelerator(**kwargs)
    check_distributed_type(accelerator.distributed_type)
    return accelerator


# Strategies that shard parameters: the EMA update pairs full teacher and student tensors, and exports,
# checksums and the teacher's checkpoint state expect full parameters on every process.
SHARDED_STRATEGIES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Stop before any work when the accelerate config asks for a parameter-sharding strategy."""
    if distributed_type in SHARDED_STRATEGIES:
        raise RecipeError(
            f"the accelerate config asks for {distributed_type.value}, which gd_hf does not support yet: the EMA "
            "teacher update, exports and checkpoints need full (unsharded) parameters. Use DDP instead "
            "(accelerate_configs/multi_gpu.yaml or multi_node.yaml)."
        )


def evaluate_on_val(
    model: torch.nn.Module, data: RunData, recipe: Recipe, accelerator: Accelerator, divisibility: int
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, float]]:
    """Mask AP of `model` on the val split; each process predicts its share, the results are gathered. Also
    returns the seconds per image of forward / post-processing / encoding and those of COCOeval."""
    val = (
        data.val
        if recipe.eval.max_images is None
        else data.val.select(range(min(recipe.eval.max_images, len(data.val))))
    )
    image_ids = list(val["image_id"])
    val_dataset = EvalDataset(val, recipe.data)
    share = torch.utils.data.Subset(
        val_dataset, range(accelerator.process_index, len(val_dataset), accelerator.num_processes)
    )
    loader = torch.utils.data.DataLoader(
        share,
        batch_size=recipe.eval.batch_size,
        num_workers=min(recipe.data.num_workers, 2),
        collate_fn=partial(collate_eval, divisibility=divisibility),
    )
    timings: dict[str, float] = {}
    results = predict_coco_results(
        model,
        loader,
        data.categories.ids,
        recipe.eval.top_k,
        accelerator.device,
        accelerator.is_local_main_process,
        timings,
    )
    if accelerator.num_processes > 1:
        results = gather_object(results)
    start = time.perf_counter()
    metrics = coco_mask_ap(data.val_ground_truth, results, image_ids=image_ids)
    # Where an evaluation's time goes (this process's share of the images; COCOeval runs on every process).
    images = max(1, timings.pop("images", 0))
    costs = {f"{stage}_s_per_image": seconds / images for stage, seconds in timings.items()}
    costs["cocoeval_s"] = time.perf_counter() - start
    return metrics, results, costs


def training_phase(step: int, ssl: SslConfig) -> str:
    """`supervised`, `burn_in` or `ema` for the step about to run: a pure function of the step and the recipe."""
    if not ssl.enabled:
        return "supervised"
    return "burn_in" if step < ssl.burn_in_steps else "ema"


def _rows(outputs: Any, rows: slice) -> SimpleNamespace:
    """The part of a batched Mask2Former output that `loss_terms` reads, for a slice of the batch."""
    return SimpleNamespace(
        masks_queries_logits=outputs.masks_queries_logits[rows],
        class_queries_logits=outputs.class_queries_logits[rows],
        auxiliary_logits=[{k: v[rows] for k, v in aux.items()} for aux in outputs.auxiliary_logits],
    )


def one_frame(labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A labeled and an unlabeled batch padded to one frame (the larger of the two, side by side), images and
    targets alike, before the teacher sees the weak view: its pseudo labels then lie in the frame of the student's
    input, as the labeled targets do (see `pad_batch`)."""
    (lh, lw), (uh, uw) = frame_size(labeled), frame_size(unlabeled)
    height, width = max(lh, uh), max(lw, uw)
    return pad_batch(labeled, height, width), pad_batch(unlabeled, height, width)


def teacher_pseudo_labels(teacher: EmaTeacher, weak_pixel_values: torch.Tensor, ssl: SslConfig, accelerator):
    """The teacher's predictions on the weak view, filtered by the recipe's pseudo-label rules."""
    with accelerator.autocast():
        outputs = teacher(pixel_values=weak_pixel_values)
    return filter_pseudo_labels(
        outputs.class_queries_logits,
        outputs.masks_queries_logits,
        ssl.pseudo_label_score_threshold,
        ssl.pseudo_label_min_area,
        ssl.pseudo_label_mask_threshold,
        ssl.pseudo_label_max_overlap,
    )


def pseudo_label_figures(pseudo, unlabeled: dict[str, Any]) -> dict[str, float]:
    """What is logged of a step's pseudo labels: how many per image, their mean score, and, when the unlabeled
    images carry hidden labels (synthetic data, ablations), their quality against those (monitoring only)."""
    counts = pseudo.counts()
    all_scores = torch.cat(pseudo.scores)
    figures = {
        "pseudo_labels_per_image": sum(counts) / len(counts),
        "pseudo_label_score": float(all_scores.mean()) if len(all_scores) else 0.0,
    }
    if any(len(c) for c in unlabeled["hidden_classes"]):
        quality = pseudo_label_quality(pseudo, unlabeled["hidden_masks"], unlabeled["hidden_classes"])
        figures.update({f"pseudo_{key}": value for key, value in quality.items() if value == value})  # not NaN
    return figures


def train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    grad_clip: float,
    unlabeled_batches: list[dict[str, Any]] | None = None,
    teacher: EmaTeacher | None = None,
    ssl: SslConfig | None = None,
    undo: UpdateUndo | None = None,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the values to log.

    With `unlabeled_batches` and a `teacher`, each micro-batch adds `ssl.unsup_loss_weight` x the same
    Mask2Former loss of the student's strong view against the teacher's pseudo labels on the weak view. The
    labeled and strong images go through the student in one forward pass (one DDP forward per backward).
    An update that makes a weight non-finite is taken back with `undo` (and counted as non-finite), or, without
    it, reported as `weights_nonfinite` for the loop to stop.
    """
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    totals: dict[str, torch.Tensor | float] = {}

    def add(key: str, value: torch.Tensor | float) -> None:
        totals[key] = totals.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value) / len(micro_batches)

    for index, batch in enumerate(micro_batches):
        unlabeled = unlabeled_batches[index] if unlabeled_batches is not None else None
        if unlabeled is not None:
            batch, unlabeled = one_frame(batch, unlabeled)
        pixel_values = batch["pixel_values"].to(device)
        labeled_count = pixel_values.shape[0]
        pseudo = None
        if unlabeled is not None:
            pseudo = teacher_pseudo_labels(teacher, unlabeled["weak_pixel_values"].to(device), ssl, accelerator)
            pixel_values = torch.cat([pixel_values, unlabeled["strong_pixel_values"].to(device)])
        # Gradients are all-reduced once, on the last micro-batch.
        sync = contextlib.nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                outputs = model(pixel_values=pixel_values, output_auxiliary_logits=True)
                labeled_rows = slice(0, labeled_count) if pseudo is not None else slice(None)
                terms = loss_terms(
                    unwrapped,
                    _rows(outputs, labeled_rows),
                    [m.to(device) for m in batch["mask_labels"]],
                    [c.to(device) for c in batch["class_labels"]],
                )
                loss = sum(terms.values())
                if pseudo is not None:
                    unsup_terms = loss_terms(
                        unwrapped, _rows(outputs, slice(labeled_count, None)), pseudo.mask_labels, pseudo.class_labels
                    )
                    unsup_loss = sum(unsup_terms.values())
                    add("loss_sup", loss)
                    add("loss_unsup", unsup_loss)
                    loss = loss + ssl.unsup_loss_weight * unsup_loss
            accelerator.backward(loss / len(micro_batches))
        add("loss", loss)
        for key in ("loss_cross_entropy", "loss_mask", "loss_dice"):
            add(key, terms[key])
        if pseudo is not None:
            for key, value in pseudo_label_figures(pseudo, unlabeled).items():
                add(key, value)
    # The gradient norm (after DDP's all-reduce: the same on every rank) also tells whether any rank's loss was
    # non-finite; clipping at inf measures it without changing anything.
    totals["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # A loss can be infinite with a finite gradient (an infinite constant term): every rank must still decide
    # alike, so the number of ranks whose loss is finite is summed over them.
    finite_losses = torch.isfinite(torch.as_tensor(totals["loss"], device=device)).float()
    totals["finite_losses"] = (
        accelerator.reduce(finite_losses, "sum") if accelerator.num_processes > 1 else finite_losses
    )
    # One host sync for all logged values and the finiteness check.
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in totals.values()]).tolist()
    logged = dict(zip(totals, values))
    every_loss_finite = logged.pop("finite_losses") == accelerator.num_processes
    if math.isfinite(logged["grad_norm"]) and every_loss_finite:
        if undo is not None:
            undo.save()
        optimizer.step()
        logged["nonfinite"] = 0.0
        # A finite loss and gradient can still make weights non-finite (a learning rate far too high): such an
        # update never reaches the EMA teacher, a checkpoint or an export.
        if not weights_finite(model, accelerator):
            if undo is not None:
                undo.restore()  # as if skipped: counted like a non-finite step
                logged["nonfinite"] = logged["update_undone"] = 1.0
            else:
                logged["weights_nonfinite"] = 1.0
        scheduler.step()
    else:  # skip the update (the caller skips the EMA update too); the schedule stays a function of the step
        logged["nonfinite"] = 1.0
        with warnings.catch_warnings():  # (torch warns when a run's first update is skipped: meant here)
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logged


def weights_finite(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    """`all_finite` of the student on every process (all processes decide alike)."""
    finite = all_finite(accelerator.unwrap_model(model)).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.to(accelerator.device), "sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def build_teacher(recipe: Recipe, student: torch.nn.Module, id2label: dict[int, str]) -> EmaTeacher | None:
    """The frozen phase-1 teacher (or, without one, a placeholder the student overwrites at burn-in's end)."""
    if not recipe.ssl.enabled:
        return None
    if recipe.ssl.teacher is None:
        return EmaTeacher(copy.deepcopy(student))
    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(recipe.ssl.teacher)
    except (OSError, ValueError) as e:
        raise RecipeError(f"ssl.teacher={recipe.ssl.teacher!r} could not be loaded: {e}") from e
    try:
        check_finite(model, f"ssl.teacher={recipe.ssl.teacher!r}")
    except NonFiniteWeightsError as e:  # found now, not at the first checkpoint hours in
        raise RecipeError(f"{e}: train the teacher again or choose another export") from e
    teacher_labels = {int(k): v for k, v in model.config.id2label.items()}
    if teacher_labels != id2label:
        raise RecipeError(
            f"ssl.teacher={recipe.ssl.teacher!r} predicts {teacher_labels}, but the data's classes are {id2label}: "
            "train the teacher on the same categories"
        )
    student_shapes = {k: v.shape for k, v in student.state_dict().items()}
    teacher_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if student_shapes != teacher_shapes:
        raise RecipeError(
            f"ssl.teacher={recipe.ssl.teacher!r} is not the recipe's architecture (model.*): the EMA phase needs "
            "teacher and student of the same shape"
        )
    return EmaTeacher(model)


def train_teacher_first(recipe: Recipe, data: RunData) -> Recipe:
    """Phase 1 in the same launch: train the supervised teacher into output_dir/teacher, return the SSL recipe.
    The teacher trains on the launch's `data` (prepared once: at COCO size a parse costs minutes)."""
    teacher_recipe = dataclasses.replace(
        recipe,
        output_dir=str(Path(recipe.output_dir) / "teacher"),
        ssl=dataclasses.replace(recipe.ssl, enabled=False),
        # hub.push_intermediate: the teacher goes to the `teacher` branch of the same repository.
        hub=dataclasses.replace(recipe.hub, push=recipe.hub.push and recipe.hub.push_intermediate, revision="teacher"),
        train=dataclasses.replace(recipe.train, max_steps=recipe.ssl.teacher_max_steps or recipe.train.max_steps),
        # `resume: PATH` names a checkpoint of the student; the teacher resumes from its own folder.
        resume="auto" if names_a_checkpoint(recipe) else recipe.resume,
    )
    named = names_a_checkpoint(recipe)
    if named:  # a checkpoint of phases 2-3 of another folder: its run's teacher is the one it started from
        teacher_recipe = dataclasses.replace(
            teacher_recipe, output_dir=str(Path(recipe.resume).parent.parent / "teacher")
        )
    if named or list_checkpoints(Path(recipe.output_dir) / "checkpoints"):
        # Phases 2-3 have begun (their checkpoints hold the teacher they started from): phase 1 is not run again,
        # so a relaunch that extends the run, or of a moved folder, leaves the teacher as it was, and a relaunch
        # that changes what is trained is stopped by the student's comparison before anything is written.
        logger.info("phases 2-3 have begun: phase 1 is done (the teacher: %s)", teacher_recipe.output_dir)
    else:
        try:
            # The launch's own folder is locked from its first write (one launch per folder, phase 1 included).
            train(teacher_recipe, data, lock_also=(recipe.output_dir,))
        except PushError as e:  # the teacher is trained and saved; only its upload failed: distillation goes on
            logger.error("%s", e)
    best = Path(teacher_recipe.output_dir) / "best"
    return dataclasses.replace(
        recipe,
        ssl=dataclasses.replace(
            recipe.ssl,
            teacher=str(best if best.is_dir() else Path(teacher_recipe.output_dir) / "final"),
            train_teacher_first=False,
        ),
    )


@dataclass
class Run:
    """What the loop works with: the recipe, the prepared data, the models and their optimizer, the batches, the
    publisher, and the run's state. `state` is all the loop changes that a checkpoint keeps."""

    recipe: Recipe
    accelerator: Accelerator
    data: RunData
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    unwrapped: Mask2FormerForUniversalSegmentation
    evaluated: Mask2FormerForUniversalSegmentation  # scored and exported: the student, or the teacher if asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher: EmaTeacher | None
    batches: TrainBatches
    publisher: Publisher
    state: RunState
    divisibility: int
    launch_recipe: Recipe  # as launched: each checkpoint records it, and a relaunch is compared with it
    undo: UpdateUndo | None  # takes back an update that made weights non-finite (train.undo_nonfinite_updates)
    log: LogWindow = field(default_factory=lambda: LogWindow())  # (LogWindow is defined below)
    # This process's bad records (data.on_error: skip) since the last checkpoint; each checkpoint adds them up over
    # the processes into state.data_skipped. Per process, so not in `state`, which every rank shares.
    skipped_since_checkpoint: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.output_dir)


def train(recipe: Recipe, data: RunData | None = None, lock_also: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a recipe to its end (resuming if there is a checkpoint); return the final val metrics. `data`: the
    launch's data, already prepared for this recipe's `data` settings (phase 1 of a one-launch run); `lock_also`:
    output folders to lock beside this recipe's (phase 1 locks its launch's)."""
    accelerator = build_accelerator(recipe)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    if data is None:  # the launch itself (not its phase 1): the output folders it locks are freed at its end
        try:
            return train(recipe, prepare_data(recipe, accelerator))  # every check happens before anything is written
        finally:
            release_output_locks()
    launch_recipe = recipe  # what the user asked for: what a relaunch is compared with
    if recipe.ssl.enabled and recipe.ssl.train_teacher_first:
        recipe = train_teacher_first(recipe, data)  # phase 1 in this launch, into output_dir/teacher
        lock_also = (*lock_also, str(Path(recipe.ssl.teacher).parent))  # the teacher's folder stays as it is
    run = set_up(recipe, data, accelerator, launch_recipe, lock_also)
    cfg, ssl = recipe.train, recipe.ssl
    progress = tqdm(total=cfg.max_steps, initial=run.state.step, desc="train", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    run.model.train()
    while run.state.step < cfg.max_steps:
        phase = training_phase(run.state.step, ssl)  # supervised, burn_in (fixed teacher) or ema
        if phase == "ema" and run.state.step == ssl.burn_in_steps:
            end_burn_in(run)  # the teacher becomes a copy of the student, then follows it by EMA
        labeled, unlabeled = run.batches.next_step(cfg.gradient_accumulation_steps)
        # The student's step: labeled images, plus the strong views with the teacher's pseudo labels of the weak.
        uses_pseudo_labels = phase == "ema" or (phase == "burn_in" and ssl.burn_in_pseudo_labels)
        terms = train_step(run.model, labeled, run.optimizer, run.scheduler, accelerator, cfg.grad_clip,
                           unlabeled if uses_pseudo_labels else None, run.teacher, ssl, run.undo)  # fmt: skip
        stop_if_weights_nonfinite(run, terms.pop("weights_nonfinite", 0.0))  # never reaches the teacher or disk
        update_skipped = skipped_for_nonfinite(run, terms)  # counted; too many in a row stop the run
        if phase == "ema" and not update_skipped:
            run.teacher.update(run.unwrapped, ssl.ema_decay)  # teacher <- decay * teacher + (1 - decay) * student
        run.state.step += 1
        run.skipped_since_checkpoint += sum(b["skipped"] for b in labeled + (unlabeled or []))
        run.log.add(terms)
        progress.update(1)
        progress.set_postfix(loss=f"{terms['loss']:.3f}")
        # Periodic actions.
        step, is_last = run.state.step, run.state.step == cfg.max_steps
        if step % cfg.log_every == 0 or is_last:
            write_log_line(run)
        if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
            evaluate_and_export_best(run)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last:
            save_run_checkpoint(run)
    progress.close()
    del run.batches  # ends the loaders' workers
    return finish(run)


def set_up(
    recipe: Recipe, data: RunData, accelerator: Accelerator, launch_recipe: Recipe, lock_also: tuple[str, ...] = ()
) -> Run:
    """Model, teacher, optimizer and schedule; the batches; the resume; the output folder's first files.
    `launch_recipe`: the recipe as launched (a one-launch run's student recipe is derived from it)."""
    cfg = recipe.train
    log_split_sizes(recipe, data)
    folders = (recipe.output_dir, *lock_also)
    # A folder that exists is locked now, before its checkpoints are read; a new one before its first write.
    hold_output_locks(accelerator, [folder for folder in folders if Path(folder).is_dir()])
    resume_from = find_resume_checkpoint(recipe)
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    changes = check_relaunch(recipe, launch_recipe, saved, resume_from) if resume_from is not None else {}
    set_seed(recipe.seed)
    model = build_model(recipe.model, data.categories.id2label)
    image_processor = build_image_processor(model, recipe.data)
    divisibility = size_divisibility(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    teacher = build_teacher(recipe, model, data.categories.id2label)
    needed = run_storage_bytes(sum(p.numel() for p in model.parameters()), cfg.keep_checkpoints, teacher is not None)
    problem = check_output_folder(Path(recipe.output_dir), needed)
    if problem:
        raise RecipeError(problem)
    # The schedule is stepped once per optimizer step by us (not once per process by accelerate): not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    evaluated = teacher.model if teacher is not None and recipe.ssl.evaluate == "teacher" else unwrapped
    state = RunState.from_dict(saved) if saved is not None else RunState()
    teacher_figures = None
    if teacher is not None and recipe.ssl.teacher is not None and resume_from is None:
        # Can this teacher teach? Measured before anything is written (a stop leaves only the teacher); a
        # resumed run checked it at its start and does not again.
        teacher_figures = check_teacher(teacher.model, data.val, recipe, divisibility, accelerator.is_main_process)
    batches = build_train_batches(recipe, data, accelerator.process_index, accelerator.num_processes, divisibility,
                                  state.step, resume_from)  # fmt: skip
    if resume_from is not None:  # model, optimizer, schedule, teacher and RNG as they were after `state.step`
        try:
            load_checkpoint(accelerator, resume_from, checkpointed_states(scheduler, teacher))
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError) as e:
            raise RecipeError(
                f"checkpoint {resume_from} cannot be loaded ({type(e).__name__}: {str(e)[:300]}). Only weights, "
                "tensors and plain values are loaded from a checkpoint folder; move this one away to resume from "
                "an earlier one, or choose another output_dir"
            ) from e
        logger.info("resumed from %s at step %d", resume_from, state.step)
        writers = saved.get("num_processes")
        if isinstance(writers, int) and writers != accelerator.num_processes:
            logger.warning(
                "%s was written by %d processes and this launch has %d: the data order is the same (step-indexed), "
                "but the new processes' random states start afresh, so the run is not bitwise what it would have been",
                resume_from, writers, accelerator.num_processes,
            )  # fmt: skip
    hold_output_locks(accelerator, folders)
    write_run_files(recipe, launch_recipe, accelerator, state.step, resume_from is not None, changes)
    publisher = Publisher.for_run(recipe, image_processor, len(data.split.labeled), len(data.split.unlabeled),
                                  len(data.val), data.categories.names)  # fmt: skip
    note = launches_note(read_launches(recipe.output_dir)) if accelerator.is_main_process else None
    if note:
        publisher.notes.append(note)
    if teacher_figures is not None:
        _log(accelerator, Path(recipe.output_dir) / "metrics.jsonl",
             {"step": state.step, **{f"teacher_check/{k}": v for k, v in teacher_figures.items()}})  # fmt: skip
        publisher.notes.append(teacher_check_note(teacher_figures))
    undo = UpdateUndo(optimizer) if cfg.undo_nonfinite_updates else None
    return Run(recipe, accelerator, data, model, unwrapped, evaluated, optimizer, scheduler, teacher, batches,
               publisher, state, divisibility, launch_recipe, undo)  # fmt: skip


def log_split_sizes(recipe: Recipe, data: RunData) -> None:
    labeled_count, unlabeled_count = len(data.split.labeled), len(data.split.unlabeled)
    if not recipe.ssl.enabled:
        logger.info(
            "labeled images: %d (of %d), val: %d", labeled_count, labeled_count + unlabeled_count, len(data.val)
        )
        return
    # As the paper (ssl.unlabeled_includes_labeled), the unlabeled stream is every training image.
    included = recipe.ssl.unlabeled_includes_labeled
    logger.info(
        "labeled images: %d, unlabeled stream: %d%s, val: %d",
        labeled_count,
        unlabeled_count + (labeled_count if included else 0),
        " (the labeled ones included)" if included else "",
        len(data.val),
    )


def write_run_files(
    recipe: Recipe,
    launch_recipe: Recipe,
    accelerator: Accelerator,
    step: int,
    resumed: bool,
    changes: dict[str, list[Any]],
) -> None:
    """The resolved recipe as launched (what relaunching it compares with), this launch's record (versions,
    commit, command, its recipe and what it changed), a metrics log without the lines of steps a resume repeats;
    the trackers."""
    output_dir = Path(recipe.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = recipe_to_dict(launch_recipe)
        write_text_atomic(output_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        record_launch(output_dir, accelerator.num_processes, accelerator.mixed_precision, resolved,
                      step if resumed else None, changes)  # fmt: skip
        drop_log_lines_after(output_dir / "metrics.jsonl", step)
    accelerator.init_trackers("tensorboard" if accelerator.log_with else "gd_hf")


def hold_output_locks(accelerator: Accelerator, folders: list[str] | tuple[str, ...]) -> None:
    """One launch per output folder: the main process takes each folder's lock (held until the launch ends); if
    one cannot be taken (another live launch holds it, or the folder is not writable), every process stops
    naming why."""
    problems = [p for p in (lock_output_folder(f) for f in folders) if p] if accelerator.is_main_process else []
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problems = broadcast_object_list([problems])[0]
    if problems:
        raise RecipeError("; ".join(problems))


def check_relaunch(
    recipe: Recipe, launch_recipe: Recipe, saved: dict[str, Any], checkpoint: Path
) -> dict[str, list[Any]]:
    """Compare this launch's recipe with the one that trained `checkpoint`: a change to what is trained (model,
    data, optimiser, schedule, batch, seed, method) stops the run unless `resume: force`; a change of how long,
    how often or where goes on with a line. Returns the changes, for the launch record."""
    previous = saved.get("recipe")
    if not isinstance(previous, dict):
        logger.warning("%s does not say which recipe trained it: the relaunch's recipe is not compared", checkpoint)
        return {}
    changes = recipe_changes(previous, recipe_to_dict(launch_recipe))
    # A supervised run (phase 1 of a one-launch run included) is not changed by the keys of phases 2-3.
    supervised = not launch_recipe.ssl.enabled and not previous.get("ssl", {}).get("enabled")
    trained = {
        key: change
        for key, change in changes.items()
        if changes_what_is_trained(key) and not (supervised and key.startswith("ssl."))
    }
    if trained and recipe.resume != "force":
        raise RecipeError(
            f"this relaunch changes what the run in {recipe.output_dir} trained (checkpoint {checkpoint.name}): "
            f"{describe_changes(trained)}. To train with the new values, start a new run (another output_dir); to "
            "go on from this checkpoint with them, relaunch with resume=force (the change is recorded in "
            "run_info.json and the model card)."
        )
    if trained:
        logger.warning("resume=force: going on from %s with %s", checkpoint, describe_changes(trained))
    others = {key: change for key, change in changes.items() if key not in trained and key != "resume"}
    if others:
        logger.info("relaunch: %s", describe_changes(others))
    return changes


def end_burn_in(run: Run) -> None:
    """The end of guided burn-in: teacher <- student (EMA from here on); the student so far is exported and
    pushed to the `burn-in` branch when `hub.push_intermediate`."""
    run.teacher.copy_from(run.unwrapped)
    hub = run.recipe.hub
    if hub.push and hub.push_intermediate and run.accelerator.is_main_process:
        step = run.state.step
        folder = run.publisher.export(run.unwrapped, "burn_in", step, None, hub.repo_id)
        run.publisher.push(folder, "burn-in", f"Student at the end of guided burn-in (step {step})")


def skipped_for_nonfinite(run: Run, terms: dict[str, float]) -> bool:
    """Count a step whose update `train_step` skipped (non-finite loss or gradient on any process); too many in a
    row stop the run, its last good checkpoint kept."""
    state, cfg = run.state, run.recipe.train
    if not terms["nonfinite"]:
        state.nonfinite_in_a_row = 0
        return False
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    what = "its update made weights non-finite" if terms.pop("update_undone", 0.0) else "non-finite loss or gradient"
    logger.warning(
        "step %d: %s (loss %s, grad norm %s): update skipped (%d in a row)",
        state.step + 1,
        what,
        terms["loss"],
        terms["grad_norm"],
        state.nonfinite_in_a_row,
    )
    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingError(
            f"{state.nonfinite_in_a_row} steps in a row were skipped (a non-finite loss or gradient, or an update "
            f"that made weights non-finite; the warnings above say which), up to step {state.step + 1}; stopping. "
            f"{last_good_checkpoint(run)} Look for broken labels around this step, or go on from it with a lower "
            "train.lr, a train.grad_clip or bf16 instead of fp16 (resume=force: the change is recorded)."
        )
    return True


def stop_if_weights_nonfinite(run: Run, weights_nonfinite: float) -> None:
    """Stop at once when a step's update made a weight non-finite although its loss and gradient were finite
    (a learning rate far too high): nothing of it is written, and the last checkpoint is as it was."""
    if weights_nonfinite:
        raise TrainingError(
            f"the update of step {run.state.step + 1} made weights non-finite (its loss and gradient were finite: "
            f"train.lr {run.recipe.train.lr:g} is likely far too high); stopping before they reach the teacher, "
            f"a checkpoint or an export (train.undo_nonfinite_updates is off). {last_good_checkpoint(run)} To go on "
            "with another train.lr from it, relaunch with resume=force (the change is recorded)."
        )


def last_good_checkpoint(run: Run) -> str:
    """The sentence naming the checkpoint a relaunch resumes from (every checkpoint holds finite weights)."""
    last = list_checkpoints(run.output_dir / "checkpoints")
    if not last:
        return "There is no checkpoint yet: a relaunch starts from the beginning."
    return f"The last good checkpoint is {last[-1]}."


class LogWindow:
    """The logged values summed since the last log line; the first line of a launch also says how long the
    launch took to reach its first step."""

    def __init__(self, first_of_launch: bool = True) -> None:
        self.sums: dict[str, list[float]] = {}  # key -> [sum, count]
        self.start, self.steps = time.perf_counter(), 0
        self.seconds_to_first_step = time.time() - PROCESS_START if first_of_launch else None

    def add(self, terms: dict[str, float]) -> None:
        self.steps += 1
        for key, value in terms.items():  # some keys (pseudo-label quality) are not logged every step
            if terms["nonfinite"] or key == "nonfinite":
                continue  # a skipped step's NaN would hide the window's other values
            self.sums.setdefault(key, [0.0, 0])
            self.sums[key][0] += value
            self.sums[key][1] += 1


def write_log_line(run: Run) -> None:
    """One metrics.jsonl line (rank 0 writes it): the window's means over all processes, the counts so far,
    speed, memory, and, after a launch's first step, its start-up time."""
    accelerator, window = run.accelerator, run.log
    record = window_means(accelerator, window.sums)
    # Bad records skipped so far (data.on_error: skip), over all processes.
    skipped = accelerator.reduce(torch.tensor(run.skipped_since_checkpoint, device=accelerator.device), "sum")
    record.update(
        nonfinite_steps=run.state.nonfinite_steps,
        data_skipped=run.state.data_skipped + skipped.item(),
        step=run.state.step,
        lr=run.scheduler.get_last_lr()[-1],
        seconds_per_step=(time.perf_counter() - window.start) / window.steps,
        seconds_since_launch=time.time() - PROCESS_START,
        peak_rss_gb=peak_rss_gb(accelerator),
    )
    if window.seconds_to_first_step is not None:
        record["seconds_to_first_step"] = window.seconds_to_first_step
    _log(accelerator, run.output_dir / "metrics.jsonl", record)
    run.log = LogWindow(first_of_launch=False)


def evaluate_and_export_best(run: Run) -> None:
    """Val mask AP of the evaluated model (and of the teacher with `ssl.evaluate: both`); a new best is exported
    to `best/`. Rank 0 decides the best; every rank learns it for the next checkpoint."""
    accelerator, step, recipe = run.accelerator, run.state.step, run.recipe
    metrics, results, costs = evaluate_on_val(run.evaluated, run.data, recipe, accelerator, run.divisibility)
    logged = {f"val/{k}": v for k, v in metrics.items()}
    logged.update({f"eval/{k}": v for k, v in costs.items()})
    if run.teacher is not None and recipe.ssl.evaluate == "both":
        teacher_metrics, *_ = evaluate_on_val(run.teacher.model, run.data, recipe, accelerator, run.divisibility)
        logged.update({f"val_teacher/{k}": v for k, v in teacher_metrics.items()})
    run.metrics = metrics
    if accelerator.is_main_process:
        write_results(run.output_dir / "predictions" / f"val_step_{step:08d}.json", results)
        _log(accelerator, run.output_dir / "metrics.jsonl", {"step": step, **logged})
        logger.info("step %d val mask AP %.2f (AP50 %.2f, AP75 %.2f)", step, metrics["AP"], metrics["AP50"],
                    metrics["AP75"])  # fmt: skip
        if metrics["AP"] > run.state.best_ap:
            run.state.best_ap, run.state.best_step = metrics["AP"], step
            run.publisher.export(run.evaluated, "best", step, metrics)
    _share_best(accelerator, run.state)


def save_run_checkpoint(run: Run) -> None:
    """A checkpoint of the run: weights, optimizer, schedule, RNG, `run.state` (with the bad records of every
    process added up), each process's stream positions and, on several processes, the replicas' checksums."""
    accelerator, state = run.accelerator, run.state
    skipped = accelerator.reduce(torch.tensor(run.skipped_since_checkpoint, device=accelerator.device), "sum")
    state.data_skipped, run.skipped_since_checkpoint = state.data_skipped + skipped.item(), 0
    if accelerator.num_processes > 1:
        state.replica_fingerprints = replica_fingerprints(accelerator, run.unwrapped, run.teacher)
    check_finite(run.unwrapped, "the student")  # a checkpoint is always one a run can go on from
    if run.teacher is not None:
        check_finite(run.teacher.model, "the teacher")
    # The checkpoint names the recipe that trained it: a relaunch compares its own with it.
    trainer_state = {**state.to_dict(), "num_processes": accelerator.num_processes,
                     "recipe": recipe_to_dict(run.launch_recipe)}  # fmt: skip
    save_checkpoint(accelerator, run.output_dir / "checkpoints", state.step, trainer_state,
                    run.recipe.train.keep_checkpoints, run.batches.data_state(),
                    checkpointed_states(run.scheduler, run.teacher))  # fmt: skip


def checkpointed_states(scheduler: torch.optim.lr_scheduler.LRScheduler, teacher: EmaTeacher | None) -> list[Any]:
    """What a checkpoint keeps beside the model, optimizer and RNG: the schedule, and the EMA teacher (part of the
    run's state in phases 2-3), in this order."""
    return [scheduler] + ([teacher] if teacher is not None else [])


def finish(run: Run) -> dict[str, float]:
    """The final export (also when the run was already complete and only resumed to this point), its metrics,
    and the final push."""
    accelerator, recipe, state = run.accelerator, run.recipe, run.state
    metrics = run.metrics
    if not metrics:
        metrics, *_ = evaluate_on_val(run.evaluated, run.data, recipe, accelerator, run.divisibility)
    if accelerator.is_main_process:
        model_id = recipe.hub.repo_id if recipe.hub.push else None
        final = run.publisher.export(run.evaluated, "final", state.step, metrics, model_id)
        final_summary = {"final": metrics, "best_ap": state.best_ap, "best_step": state.best_step}
        write_text_atomic(run.output_dir / "final_metrics.json", json.dumps(final_summary, indent=2))
        print(_format_metrics(metrics, state.step), flush=True)
        if run.publisher.teacher_metrics is not None:
            print(_side_by_side(run.publisher.teacher_metrics, metrics), flush=True)
        if recipe.hub.push:
            message = f"Model after {state.step} steps (mask AP {metrics['AP']:.2f})"
            run.publisher.push(final, recipe.hub.revision, message)
    # Not accelerator.end_training(): it destroys the process group, which the distillation phase of a
    # `ssl.train_teacher_first` launch still needs; main() ends the group once everything is done.
    for tracker in accelerator.trackers:
        tracker.finish()
    run.publisher.raise_failures()
    return metrics


try:
    import resource  # peak memory of this process (POSIX)
except ImportError:  # Windows
    resource = None

# When this process started (the launch, for the time to the first step), from the OS, not from an import.
PROCESS_START = psutil.Process().create_time()


def peak_rss_gb(accelerator: Accelerator) -> float:
    """The largest peak resident memory of any process so far, in GB (the training process itself; DataLoader
    workers are processes of their own)."""
    if resource is not None:  # ru_maxrss: kilobytes on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)
    else:
        peak = psutil.Process().memory_info().peak_wset / 1e9
    mine = torch.tensor([peak], device=accelerator.device)
    return float(accelerator.gather(mine).max()) if accelerator.num_processes > 1 else float(mine)


def window_means(accelerator: Accelerator, window: dict[str, list[float]]) -> dict[str, float]:
    """Each logged value averaged over the steps of the window and over all processes (a key some processes
    lack, like pseudo-label quality without hidden labels, is averaged over those that have it)."""
    windows = gather_object([window]) if accelerator.num_processes > 1 else [window]
    sums: dict[str, list[float]] = {}
    for each in windows:
        for key, (total, count) in each.items():
            sums.setdefault(key, [0.0, 0])
            sums[key][0] += total
            sums[key][1] += count
    return {key: total / count for key, (total, count) in sums.items()}


def replica_fingerprints(
    accelerator: Accelerator, student: torch.nn.Module, teacher: EmaTeacher | None
) -> dict[str, list[float]]:
    """A float64 checksum of the student's and the teacher's weights on every process: they must all agree
    (DDP keeps students in sync; the EMA teacher is updated from them on each rank). Diverged replicas would
    train silently on different models, so they stop the run."""

    def checksum(module: torch.nn.Module) -> float:
        return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(module.state_dict().values())
                         if p.is_floating_point()))  # fmt: skip

    mine = {"student": checksum(student)}
    if teacher is not None:
        mine["teacher"] = checksum(teacher.model)
    everyone = gather_object([mine])
    fingerprints = {key: [f[key] for f in everyone] for key in mine}
    diverged = [key for key, values in fingerprints.items() if len(set(values)) > 1]
    if diverged:
        raise TrainingError(f"the {' and '.join(diverged)} weights differ between processes: {fingerprints}")
    return fingerprints


def _log(accelerator: Accelerator, path: Path, record: dict[str, Any]) -> None:
    if not accelerator.is_main_process:
        return
    with path.open("a") as f:
        f.write(
            json.dumps(
                {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
            )
            + "\n"
        )
    if accelerator.log_with:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def drop_log_lines_after(path: Path, step: int) -> None:
    """Remove metrics-log lines of steps after `step` (a resumed run repeats those steps), and a torn line (what a
    kill or a full disk leaves in the middle of an append)."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning("%s: dropping line %d, which is not whole (%r)", path, number, line[:80])
            continue
        logged_step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(logged_step, int) or isinstance(logged_step, bool):
            logger.warning("%s: dropping line %d, which has no step (%r)", path, number, line[:80])
            continue
        if logged_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_text_atomic(path, "".join(kept))


def _share_best(accelerator: Accelerator, state: RunState) -> None:
    """Rank 0 decides the best evaluation; every rank takes its AP and step, for the next checkpoint. (Only
    these: the rest of the state is the same on every rank, or, like the bad-record count, this rank's own.)"""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    state.best_ap, state.best_step = broadcast_object_list([(state.best_ap, state.best_step)])[0]


def _format_metrics(metrics: dict[str, float], step: int) -> str:
    header = " | ".join(f"{k:>6}" for k in metrics)
    values = " | ".join(f"{v:6.2f}" for v in metrics.values())
    return f"val mask AP after {step} steps\n{header}\n{values}"


def _side_by_side(teacher: dict[str, float], student: dict[str, float]) -> str:
    rows = [f"{'':>9} | {'supervised teacher':>18} | {'distilled student':>17}"]
    rows += [f"{k:>9} | {teacher[k]:18.2f} | {student[k]:17.2f}" for k in student if k in teacher]
    return "val mask AP, side by side\n" + "\n".join(rows)


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
    parser = argparse.ArgumentParser(
        prog="python -m gd_hf.train", description="Train a Mask2Former recipe (see recipes/*.yaml)."
    )
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
