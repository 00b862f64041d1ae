"""The training recipe: `accelerate launch -m gd_hf.train recipes/NAME.yaml [key=value ...]`.

Reads top to bottom: recipe -> data -> model/optimizer -> resume -> loop (step, log, evaluate, checkpoint)
-> final evaluation and export. Phase 1 of Guided Distillation (supervised training on the labeled split).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import psutil
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import DistributedType, gather_object, set_seed
from pycocotools.coco import COCO
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm
from transformers import Mask2FormerForUniversalSegmentation

from gd_hf.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    read_data_state,
    read_trainer_state,
    save_checkpoint,
)
from gd_hf.config import Recipe, RecipeError, SslConfig, load_recipe, recipe_to_dict
from gd_hf.data.coco import DataError
from gd_hf.data.loading import (
    EvalDataset,
    LabeledTrainDataset,
    StepBatchSampler,
    StreamedTrainDataset,
    UnlabeledTrainDataset,
    collate_eval,
    collate_train,
    collate_unlabeled,
    frame_size,
    labeled_sample,
    pad_batch,
    repeat_factors,
    unlabeled_sample,
)
from gd_hf.data.sources import (
    Categories,
    Records,
    check_record,
    image_folder_records,
    image_ids_and_object_counts,
    open_source,
    select_ids,
)
from gd_hf.data.splits import Split, split_image_ids
from gd_hf.data.synthetic import generate as generate_synthetic
from gd_hf.data.transforms import StrongAugment
from gd_hf.evaluation import coco_mask_ap, predict_coco_results, write_results
from gd_hf.hub import export_model
from gd_hf.model_card import RunSummary
from gd_hf.modeling import build_image_processor, build_model, loss_terms, size_divisibility
from gd_hf.optim import build_lr_scheduler, build_optimizer
from gd_hf.pseudo_labels import filter_pseudo_labels, pseudo_label_quality
from gd_hf.push import PushError, push_export
from gd_hf.run_info import check_output_folder, record_launch, run_storage_bytes
from gd_hf.teacher import EmaTeacher

logger = logging.getLogger("gd_hf.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what is kept and what to try."""


@dataclass
class RunData:
    """Everything the loop needs to know about the data, validated before any output is written."""

    labeled: Records  # gd_hf records of the labeled images (map-style, or a stream with data.streaming)
    unlabeled: Records  # of the unlabeled split (all train images by default, as the paper)
    val: datasets.Dataset
    val_ground_truth: COCO
    categories: Categories
    split: Split


def prepare_data(recipe: Recipe, accelerator: Accelerator) -> RunData:
    """Generate the synthetic set if asked and absent, open the source, split labeled/unlabeled (see
    gd_hf.data.sources)."""
    d = recipe.data
    if d.generate_synthetic and Path(d.train_annotations).is_file():
        images = json.loads(Path(d.train_annotations).read_text())["images"]
        found, varied = len(images), len({(i["width"], i["height"]) for i in images}) > 1
        if found != d.synthetic_train_images or (varied != d.synthetic_varied_sizes and found > 1):
            raise DataError(
                f"{d.train_annotations} holds a synthetic set of {found} training images "
                f"({'mixed sizes' if varied else 'squares'}) but the recipe asks for {d.synthetic_train_images} "
                f"({'mixed sizes' if d.synthetic_varied_sizes else 'squares'}): delete "
                f"{Path(d.train_annotations).parent.parent} to generate it anew, or point data.train_* / data.val_* "
                "elsewhere"
            )
    if d.generate_synthetic and not Path(d.train_annotations).exists():
        root = Path(d.train_annotations).parent.parent  # <root>/annotations/instances_train.json
        with accelerator.main_process_first():
            if accelerator.is_main_process and not root.exists():
                logger.info("generating the synthetic data set in %s", root)
                generate_synthetic(
                    root,
                    d.synthetic_train_images,
                    d.synthetic_val_images,
                    d.synthetic_image_size,
                    recipe.seed,
                    d.synthetic_varied_sizes,
                )
    # COCO: the main process of each machine parses and caches the records first (data.records_cache), the others
    # read its cache. Other sources wait on `datasets`' own file locks, with no collective timeout.
    first = d.source == "coco" and d.records_cache is not None
    with accelerator.local_main_process_first() if first else contextlib.nullcontext():
        opened = open_source(d)
    ids, object_counts = image_ids_and_object_counts(opened.train)
    split = split_image_ids(ids, object_counts, d.labeled_percent, d.split_seed, d.split_file, opened.description)
    row_ids = ids if isinstance(opened.train, datasets.Dataset) else None
    labeled = select_ids(opened.train, split.labeled, row_ids)
    unlabeled = (
        opened.train if recipe.ssl.unlabeled_includes_labeled else select_ids(opened.train, split.unlabeled, row_ids)
    )
    if d.unlabeled_images:
        folder = image_folder_records(d.unlabeled_images).cast_column("image", datasets.Image(decode=False))
        split = Split(split.labeled, split.unlabeled + list(folder["image_id"]))
        if not isinstance(unlabeled, datasets.Dataset):
            folder = folder.to_iterable_dataset(num_shards=min(64, len(folder)))
        unlabeled = datasets.concatenate_datasets([unlabeled, folder])
    return RunData(labeled, unlabeled, opened.val, opened.val_ground_truth, opened.categories, split)


def find_resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from according to `recipe.resume` (see `Recipe.resume`)."""
    checkpoint_dir = Path(recipe.output_dir) / "checkpoints"
    complete = list_checkpoints(checkpoint_dir)
    if recipe.resume == "none":
        if complete:
            raise RecipeError(
                f"resume: none, but {checkpoint_dir} already holds checkpoints: set resume: auto to continue, "
                "or choose another output_dir"
            )
        return None
    if recipe.resume == "auto":
        partial_ones = sorted(p.name for p in checkpoint_dir.glob(".tmp_step_*")) if checkpoint_dir.is_dir() else []
        if partial_ones:
            logger.warning(
                "ignoring partial checkpoint(s) %s in %s (a run stopped while writing)", partial_ones, checkpoint_dir
            )
        return complete[-1] if complete else None
    path = Path(recipe.resume)
    if not path.is_dir():
        raise RecipeError(f"resume: {recipe.resume} is neither 'auto', 'none' nor an existing checkpoint folder")
    return path


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
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the values to log.

    With `unlabeled_batches` and a `teacher`, each micro-batch adds `ssl.unsup_loss_weight` x the same
    Mask2Former loss of the student's strong view against the teacher's pseudo labels on the weak view. The
    labeled and strong images go through the student in one forward pass (one DDP forward per backward).
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
            with accelerator.autocast():
                teacher_outputs = teacher(pixel_values=unlabeled["weak_pixel_values"].to(device))
            pseudo = filter_pseudo_labels(
                teacher_outputs.class_queries_logits,
                teacher_outputs.masks_queries_logits,
                ssl.pseudo_label_score_threshold,
                ssl.pseudo_label_min_area,
                ssl.pseudo_label_mask_threshold,
                ssl.pseudo_label_max_overlap,
            )
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
            counts = pseudo.counts()
            add("pseudo_labels_per_image", sum(counts) / len(counts))
            all_scores = torch.cat(pseudo.scores)
            add("pseudo_label_score", float(all_scores.mean()) if len(all_scores) else 0.0)
            if any(len(c) for c in unlabeled["hidden_classes"]):
                quality = pseudo_label_quality(pseudo, unlabeled["hidden_masks"], unlabeled["hidden_classes"])
                for key, value in quality.items():
                    if value == value:  # not NaN
                        add(f"pseudo_{key}", value)
    # The gradient norm (after DDP's all-reduce: the same on every rank) also tells whether any rank's loss was
    # non-finite; clipping at inf measures it without changing anything.
    totals["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # One host sync for all logged values and the finiteness check.
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in totals.values()]).tolist()
    logged = dict(zip(totals, values))
    if math.isfinite(logged["grad_norm"]) and math.isfinite(logged["loss"]):
        optimizer.step()
        logged["nonfinite"] = 0.0
    else:  # skip the update (the caller skips the EMA update too); the schedule stays a function of the step
        logged["nonfinite"] = 1.0
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logged


def strong_augment(ssl: SslConfig) -> StrongAugment:
    """The strong view of the recipe (the reference's, with the hue/grayscale/erasing knobs of `ssl`)."""
    return StrongAugment(hue=ssl.strong_hue, grayscale_prob=ssl.strong_grayscale_prob, erase_prob=ssl.strong_erase_prob)


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
    )
    try:
        train(teacher_recipe, data)
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


def train(recipe: Recipe, data: RunData | None = None) -> dict[str, Any]:
    """Run a recipe to its end (resuming if there is a checkpoint); return the final val metrics. `data`: the
    launch's data, already prepared for this recipe's `data` settings (phase 1 of a one-launch run)."""
    accelerator = build_accelerator(recipe)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    cfg = recipe.train
    output_dir = Path(recipe.output_dir)

    # --- Data: every check happens before anything is written to output_dir.
    if data is None:
        data = prepare_data(recipe, accelerator)
    if recipe.ssl.enabled and recipe.ssl.train_teacher_first:
        recipe = train_teacher_first(recipe, data)
    resume_from = find_resume_checkpoint(recipe)
    labeled_count, unlabeled_count = len(data.split.labeled), len(data.split.unlabeled)
    if not recipe.ssl.enabled:
        logger.info(
            "labeled images: %d (of %d), val: %d", labeled_count, labeled_count + unlabeled_count, len(data.val)
        )
    else:
        # As the paper (ssl.unlabeled_includes_labeled), the unlabeled stream is every training image.
        included = recipe.ssl.unlabeled_includes_labeled
        logger.info(
            "labeled images: %d, unlabeled stream: %d%s, val: %d",
            labeled_count,
            unlabeled_count + (labeled_count if included else 0),
            " (the labeled ones included)" if included else "",
            len(data.val),
        )

    # --- Model, optimizer, schedule.
    set_seed(recipe.seed)
    model = build_model(recipe.model, data.categories.id2label)
    image_processor = build_image_processor(model, recipe.data)
    divisibility = size_divisibility(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    teacher = build_teacher(recipe, model, data.categories.id2label)
    needed = run_storage_bytes(sum(p.numel() for p in model.parameters()), cfg.keep_checkpoints, teacher is not None)
    problem = check_output_folder(output_dir, needed)
    if problem:
        raise RecipeError(problem)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule is stepped once per optimizer step by us (not once per process by accelerate).
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher.to(accelerator.device)
        accelerator.register_for_checkpointing(teacher)  # the EMA teacher is part of the run's state
    unwrapped = accelerator.unwrap_model(model)
    # The model that is evaluated and exported: the student, unless the recipe asks for the teacher.
    evaluated = teacher.model if teacher is not None and recipe.ssl.evaluate == "teacher" else unwrapped
    state = {"step": 0, "best_ap": -1.0, "best_step": None}
    if resume_from is not None:
        state = read_trainer_state(resume_from)

    # --- Data loader: the sampler is indexed by micro-batch, so resuming = starting it at the right step.
    def step_indexed_batches(
        dataset, batch_size: int, seed: int, collate, factors: np.ndarray | None = None
    ) -> Iterator[dict[str, Any]]:
        sampler = StepBatchSampler(
            num_items=len(dataset),
            batch_size=batch_size // cfg.gradient_accumulation_steps,
            seed=seed,
            start_step=state["step"] * cfg.gradient_accumulation_steps,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            repeat_factors=factors,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=recipe.data.num_workers,
            collate_fn=partial(collate, divisibility=divisibility),
            persistent_workers=recipe.data.num_workers > 0,
        )
        return iter(loader)  # draws a seed from torch's RNG: created before the RNG state is restored

    # With data.streaming the loaders are StatefulDataLoaders whose positions are saved in each checkpoint.
    stream_loaders: dict[str, StatefulDataLoader] = {}
    stream_states = read_data_state(resume_from, accelerator.process_index) if resume_from is not None else {}

    def streamed_batches(name: str, records, make_sample, batch_size: int, seed: int, collate) -> Iterator[dict]:
        dataset = StreamedTrainDataset(
            records, make_sample, recipe.data, seed, accelerator.process_index, accelerator.num_processes, check_record
        )
        loader = StatefulDataLoader(
            dataset,
            batch_size=batch_size // cfg.gradient_accumulation_steps,
            num_workers=recipe.data.num_workers,
            collate_fn=partial(collate, divisibility=divisibility),
            persistent_workers=recipe.data.num_workers > 0,
        )
        if name in stream_states:
            loader.load_state_dict(stream_states[name])
        elif resume_from is not None:
            logger.warning("no saved position of the %s stream in %s: it starts from the beginning", name, resume_from)
        stream_loaders[name] = loader
        return iter(loader)

    d = recipe.data
    if d.streaming:
        batches = streamed_batches(
            "labeled", data.labeled, partial(labeled_sample, data=d), cfg.batch_size, recipe.seed, collate_train
        )
    else:
        # Phases 2-3 draw rare-class labeled images more often, as the reference (ssl.labeled_repeat_threshold).
        factors = None
        if recipe.ssl.enabled and recipe.ssl.labeled_repeat_threshold is not None:
            # Only the class column is read (not the masks); crowd regions count, as in detectron2.
            image_categories = data.labeled.select_columns(["objects"]).flatten()["objects.category"]
            factors = repeat_factors(image_categories, recipe.ssl.labeled_repeat_threshold)
            logger.info(
                "repeat-factor sampling of the labeled images (threshold %g): factors %.2f to %.2f",
                recipe.ssl.labeled_repeat_threshold,
                factors.min(),
                factors.max(),
            )
        labeled = LabeledTrainDataset(data.labeled, d)
        batches = step_indexed_batches(labeled, cfg.batch_size, recipe.seed, collate_train, factors)
    unlabeled_batches = None
    if recipe.ssl.enabled:
        if not recipe.ssl.unlabeled_includes_labeled and not data.split.unlabeled:
            raise DataError(
                "the unlabeled split is empty: lower data.labeled_percent or set ssl.unlabeled_includes_labeled"
            )
        # A different seed: the unlabeled stream is not in the labeled stream's order.
        if d.streaming:
            make_views = partial(unlabeled_sample, data=d, strong=strong_augment(recipe.ssl))
            unlabeled_batches = streamed_batches(
                "unlabeled",
                data.unlabeled,
                make_views,
                recipe.ssl.unlabeled_batch_size,
                recipe.seed + 1,
                collate_unlabeled,
            )
        else:
            unlabeled = UnlabeledTrainDataset(data.unlabeled, d, strong_augment(recipe.ssl))
            unlabeled_batches = step_indexed_batches(
                unlabeled, recipe.ssl.unlabeled_batch_size, recipe.seed + 1, collate_unlabeled
            )

    # --- Resume: model, optimizer, schedule and RNG states as they were after step `state["step"]`.
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        record_launch(output_dir, accelerator.num_processes, accelerator.mixed_precision)  # versions, commit, command
        # Lines logged after the checkpoint we resume from will be logged again: drop them.
        drop_log_lines_after(output_dir / "metrics.jsonl", state["step"])
    accelerator.init_trackers("tensorboard" if accelerator.log_with else "gd_hf")

    # --- Model cards and pushes (rank 0 only).
    teacher_results = Path(recipe.ssl.teacher or "") / "eval_results.json"
    teacher_metrics = (
        json.loads(teacher_results.read_text()) if recipe.ssl.enabled and teacher_results.is_file() else None
    )

    def summary(step: int, val_metrics: dict[str, float]) -> RunSummary:
        return RunSummary(
            recipe=recipe,
            stage="guided distillation" if recipe.ssl.enabled else "supervised",
            step=step,
            metrics=val_metrics,
            num_labeled=len(data.split.labeled),
            num_unlabeled=len(data.split.unlabeled),
            num_val=len(data.val),
            class_names=data.categories.names,
            teacher_metrics=teacher_metrics,
        )

    push_failures: list[str] = []

    def push_or_report(folder: Path, revision: str | None, message: str) -> None:
        """A failed push is reported at the end of the run; the local outputs are complete either way."""
        try:
            url = push_export(folder, recipe.hub.repo_id, revision, recipe.hub.private, message, recipe.hub.retries)
            logger.info("pushed %s -> %s", folder, url)
        except PushError as e:
            logger.error("%s", e)
            push_failures.append(str(e))

    # --- The loop.
    metrics_log = output_dir / "metrics.jsonl"
    progress = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc="train",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    model.train()
    window: dict[str, list[float]] = {}  # key -> [sum, count] since the last log line
    window_start, steps_in_window = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    skipped_here = 0  # bad records skipped by this process since the last checkpoint
    nonfinite_total = consecutive_nonfinite = 0  # steps skipped for a non-finite loss/gradient (this launch)
    # Seconds from the process's start to this launch's first step (data, model, resume): logged once.
    startup_seconds: float | None = time.time() - PROCESS_START
    while state["step"] < cfg.max_steps:
        phase = training_phase(state["step"], recipe.ssl)
        if phase == "ema" and state["step"] == recipe.ssl.burn_in_steps:
            teacher.copy_from(unwrapped)  # end of burn-in: teacher <- student, EMA from here on
            if recipe.hub.push and recipe.hub.push_intermediate and accelerator.is_main_process:
                folder = export_model(
                    unwrapped,
                    image_processor,
                    output_dir / "burn_in",
                    None,
                    summary(state["step"], {}),
                    recipe.hub.repo_id,
                )
                push_or_report(folder, "burn-in", f"Student at the end of guided burn-in (step {state['step']})")
        micro_batches = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        # Both streams advance every step, so the unlabeled position is a function of the step too.
        unlabeled_micro = (
            [next(unlabeled_batches) for _ in range(cfg.gradient_accumulation_steps)]
            if unlabeled_batches is not None
            else None
        )
        use_pseudo_labels = phase == "ema" or (phase == "burn_in" and recipe.ssl.burn_in_pseudo_labels)
        step_terms = train_step(
            model,
            micro_batches,
            optimizer,
            scheduler,
            accelerator,
            cfg.grad_clip,
            unlabeled_micro if use_pseudo_labels else None,
            teacher,
            recipe.ssl,
        )
        if step_terms["nonfinite"]:
            nonfinite_total += 1
            consecutive_nonfinite += 1
            logger.warning(
                "step %d: non-finite loss or gradient (loss %s, grad norm %s): update skipped (%d in a row)",
                state["step"] + 1,
                step_terms["loss"],
                step_terms["grad_norm"],
                consecutive_nonfinite,
            )
            if consecutive_nonfinite >= cfg.max_nonfinite_steps:
                last = list_checkpoints(output_dir / "checkpoints")
                raise TrainingError(
                    f"{consecutive_nonfinite} steps in a row had a non-finite loss or gradient (up to step "
                    f"{state['step'] + 1}); stopping. The last good checkpoint is "
                    f"{last[-1] if last else 'none (no checkpoint yet)'}; resume: auto continues from it. Try a lower "
                    "train.lr, train.grad_clip, bf16 instead of fp16, or look for broken labels around this step."
                )
        else:
            consecutive_nonfinite = 0
            if phase == "ema":
                teacher.update(unwrapped, recipe.ssl.ema_decay)
        skipped_here += sum(b["skipped"] for b in micro_batches + (unlabeled_micro or []))
        state["step"] += 1
        step = state["step"]
        progress.update(1)
        progress.set_postfix(loss=f"{step_terms['loss']:.3f}")
        steps_in_window += 1
        for key, value in step_terms.items():  # some keys (pseudo-label quality) are not logged every step
            if step_terms["nonfinite"] or key == "nonfinite":
                continue  # a skipped step's NaN would hide the window's other values
            window.setdefault(key, [0.0, 0])
            window[key][0] += value
            window[key][1] += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = window_means(accelerator, window)
            # Bad records skipped so far (data.on_error: skip), over all processes.
            skipped = accelerator.reduce(torch.tensor(skipped_here, device=accelerator.device), "sum").item()
            record.update(
                nonfinite_steps=nonfinite_total,
                data_skipped=state.get("data_skipped", 0) + skipped,
                step=step,
                lr=scheduler.get_last_lr()[-1],
                seconds_per_step=(time.perf_counter() - window_start) / steps_in_window,
                seconds_since_launch=time.time() - PROCESS_START,
                peak_rss_gb=peak_rss_gb(accelerator),
            )
            if startup_seconds is not None:
                record["seconds_to_first_step"], startup_seconds = startup_seconds, None
            _log(accelerator, metrics_log, record)
            window, window_start, steps_in_window = {}, time.perf_counter(), 0

        is_last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or is_last:
            metrics, results, costs = evaluate_on_val(evaluated, data, recipe, accelerator, divisibility)
            logged = {f"val/{k}": v for k, v in metrics.items()}
            logged.update({f"eval/{k}": v for k, v in costs.items()})
            if teacher is not None and recipe.ssl.evaluate == "both":
                teacher_metrics, *_ = evaluate_on_val(teacher.model, data, recipe, accelerator, divisibility)
                logged.update({f"val_teacher/{k}": v for k, v in teacher_metrics.items()})
            if accelerator.is_main_process:
                write_results(output_dir / "predictions" / f"val_step_{step:08d}.json", results)
                _log(accelerator, metrics_log, {"step": step, **logged})
                logger.info(
                    "step %d val mask AP %.2f (AP50 %.2f, AP75 %.2f)",
                    step,
                    metrics["AP"],
                    metrics["AP50"],
                    metrics["AP75"],
                )
                if metrics["AP"] > state["best_ap"]:
                    state["best_ap"], state["best_step"] = metrics["AP"], step
                    export_model(
                        evaluated,
                        image_processor,
                        output_dir / "best",
                        {"step": step, **metrics},
                        summary(step, metrics),
                    )
            state = _broadcast_state(accelerator, state)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last:
            skipped = accelerator.reduce(torch.tensor(skipped_here, device=accelerator.device), "sum").item()
            state["data_skipped"], skipped_here = state.get("data_skipped", 0) + skipped, 0
            data_state = {name: loader.state_dict() for name, loader in stream_loaders.items()}
            if accelerator.num_processes > 1:
                state["replica_fingerprints"] = replica_fingerprints(accelerator, unwrapped, teacher)
            save_checkpoint(accelerator, output_dir / "checkpoints", step, state, cfg.keep_checkpoints, data_state)
    progress.close()
    del batches

    # --- Final export (also when the run was already complete and only resumed to this point).
    if not metrics:
        metrics, *_ = evaluate_on_val(evaluated, data, recipe, accelerator, divisibility)
    if accelerator.is_main_process:
        model_id = recipe.hub.repo_id if recipe.hub.push else None
        final = export_model(
            evaluated,
            image_processor,
            output_dir / "final",
            {"step": state["step"], **metrics},
            summary(state["step"], metrics),
            model_id,
        )
        final_summary = {"final": metrics, "best_ap": state["best_ap"], "best_step": state["best_step"]}
        (output_dir / "final_metrics.json").write_text(json.dumps(final_summary, indent=2))
        print(_format_metrics(metrics, state["step"]), flush=True)
        if teacher_metrics is not None:
            print(_side_by_side(teacher_metrics, metrics), flush=True)
        if recipe.hub.push:
            push_or_report(
                final, recipe.hub.revision, f"Model after {state['step']} steps (mask AP {metrics['AP']:.2f})"
            )
    # Not accelerator.end_training(): it destroys the process group, which the distillation phase of a
    # `ssl.train_teacher_first` launch still needs; main() ends the group once everything is done.
    for tracker in accelerator.trackers:
        tracker.finish()
    if push_failures:
        raise PushError("\n".join(push_failures))
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
    """Remove metrics-log lines of steps after `step` (a resumed run repeats those steps)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _broadcast_state(accelerator: Accelerator, state: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 decides the best checkpoint; every rank must agree on it for the next checkpoint."""
    if accelerator.num_processes == 1:
        return state
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([state])[0]


def _format_metrics(metrics: dict[str, float], step: int) -> str:
    header = " | ".join(f"{k:>6}" for k in metrics)
    values = " | ".join(f"{v:6.2f}" for v in metrics.values())
    return f"val mask AP after {step} steps\n{header}\n{values}"


def _side_by_side(teacher: dict[str, float], student: dict[str, float]) -> str:
    rows = [f"{'':>9} | {'supervised teacher':>18} | {'distilled student':>17}"]
    rows += [f"{k:>9} | {teacher[k]:18.2f} | {student[k]:17.2f}" for k in student if k in teacher]
    return "val mask AP, side by side\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gd_hf.train", description="Train a Mask2Former recipe (see recipes/*.yaml)."
    )
    parser.add_argument("recipe", help="path of a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        try:
            train(recipe)
        finally:
            PartialState().destroy_process_group()
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except PushError as e:  # training finished and its outputs are saved; only the upload failed
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
