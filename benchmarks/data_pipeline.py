"""Is the data loader fast enough? Images/s the loaders deliver vs images/s a training step consumes, side by side.

    python benchmarks/data_pipeline.py [--batches 30] [--num-workers N] [--streaming] [--supervised] [key=value ...]

Loader side: the labeled loader (decode + scale jitter/crop/flip + collate) and the unlabeled one (decode + one
geometry, weak and strong views + collate), built as the training loop builds them (map-style with the
step-indexed sampler, or `--streaming` through `StreamedTrainDataset` + `StatefulDataLoader`), with the
recipe's workers (`data.num_workers`, or `--num-workers`). Timed after the workers have started, with nothing
else running, so it is the most the loaders can give.

Step side: one Guided Distillation step of the recipe's model (`--supervised`: a supervised step) on one
collated batch, as `benchmarks/train_step.py` times it. Images consumed per step = labeled batch + unlabeled
batch. Goal: loader images/s >= 3 x the step's consumption. On a machine with few cores the two compete for
the same cores in a real run; the ratio says how much head-room the loader has.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from train_step import gd_hf_step  # benchmarks/train_step.py: the step as the loop runs it

from gd_hf.config import load_recipe
from gd_hf.data.batches import build_train_batches
from gd_hf.data.categories import Categories
from gd_hf.data.coco import load_coco, to_hf_dataset
from gd_hf.data.prepare import RunData
from gd_hf.data.splits import Split
from gd_hf.data.synthetic import generate
from gd_hf.method import GuidedDistillation
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models import build_model, family_of
from gd_hf.run.optim import build_lr_scheduler, build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def loaders(source, recipe, padding_divisor: int, streaming: bool, num_workers: int):
    """The labeled and unlabeled batch iterators exactly as a run builds them (`build_train_batches`: the
    recipe's strong view, sampler, workers), over all of `source` as both splits."""
    recipe = dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, streaming=streaming, num_workers=num_workers),
        ssl=dataclasses.replace(recipe.ssl, enabled=True, unlabeled_includes_labeled=True),
    )
    records = to_hf_dataset(source)
    if streaming:
        records = records.to_iterable_dataset(num_shards=max(1, num_workers) * 4)
    ids = sorted(source.images)
    categories = Categories(source.category_ids, source.category_names)
    data = RunData(records, records, None, None, categories, Split(ids, []))
    batches = build_train_batches(recipe, data, 0, 1, padding_divisor, 0, None)
    return batches.labeled, batches.unlabeled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo_synthetic.yaml"))
    parser.add_argument("--batches", type=int, default=30, help="timed loader batches (of each loader)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--num-workers", type=int, help="default: the recipe's data.num_workers")
    parser.add_argument("--streaming", action="store_true", help="the streamed loaders instead of map-style")
    parser.add_argument("--supervised", action="store_true", help="time a supervised step, no unlabeled loader")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    num_workers = recipe.data.num_workers if args.num_workers is None else args.num_workers

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synthetic", train=64, val=1, size=recipe.data.synthetic_image_size)
        source = load_coco(root / "annotations" / "instances_train.json", root / "train")
        torch.manual_seed(0)
        model = build_model(recipe.model, source.id2label)
        padding_divisor = family_of(model).padding_divisor(model)
        labeled_iter, unlabeled_iter = loaders(source, recipe, padding_divisor, args.streaming, num_workers)

        # --- Loader side (the workers start and fill their queues during the warm-up batches).
        for _ in range(4):
            batch = next(labeled_iter)
            unlabeled = next(unlabeled_iter)
        start = time.perf_counter()
        images = 0
        for _ in range(args.batches):
            images += len(next(labeled_iter)["image_ids"])
            if not args.supervised:
                images += len(next(unlabeled_iter)["image_ids"])
        loader_rate = images / (time.perf_counter() - start)
        del labeled_iter, unlabeled_iter

    # --- Step side.
    ssl = dataclasses.replace(recipe.ssl, enabled=True, pseudo_label_score_threshold=0.0)
    family = family_of(model)
    teacher = None if args.supervised else EmaTeacher(copy.deepcopy(model), family.scheduled_buffers)
    method = GuidedDistillation.supervised(family) if teacher is None else GuidedDistillation(ssl, family, teacher)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_lr_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if teacher is not None:
        teacher.to(accelerator.device)

    def step() -> float:
        start = time.perf_counter()
        gd_hf_step(model, batch, unlabeled, optimizer, scheduler, accelerator, recipe.train.grad_clip, method, None)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):
        step()
    step_time = statistics.median(step() for _ in range(args.steps))
    per_step = len(batch["image_ids"]) + (0 if teacher is None else len(unlabeled["image_ids"]))
    step_rate = per_step / step_time

    kind = "supervised" if teacher is None else "guided distillation"
    print(
        f"loaders: {'streamed' if args.streaming else 'map-style'}, workers {num_workers}, crop {recipe.data.crop_size}; "
        f"step: {kind}, {per_step} images, device {accelerator.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"loader delivers:   {loader_rate:8.1f} images/s")
    print(f"training consumes: {step_rate:8.1f} images/s ({step_time * 1000:.0f} ms per step)")
    print(f"ratio:             {loader_rate / step_rate:8.2f}  (goal >= 3)")


if __name__ == "__main__":
    main()
