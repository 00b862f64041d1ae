"""One training step of gd_hf's loop vs the bare model forward+backward on the same batch, side by side.

    python benchmarks/train_step.py [--steps 20] [--recipe recipes/demo_synthetic.yaml] [key=value ...]

Either model family: `model.family=eomt` times EoMT (its step starts with the loop's `start_step`, which writes
the annealing schedule's masked-attention probabilities, at a step of the EMA phase mid-annealing).

With `--distill`, the step is a Guided Distillation step: "ours" = `train_step` with a teacher and an
unlabeled batch (teacher forward on the weak view, pseudo-label filtering, one student forward on labeled +
strong images, both losses) + the EMA update; "bare" = its parts run plainly: teacher forward on the weak view,
student forward+backward on the labeled batch and on the strong view (against the teacher's pseudo labels, made
once beforehand), optimizer step.
`--bare-one-forward` gives the bare step gd_hf's one batched student forward instead of two, which separates
gd_hf's own cost from the cost of batching (on a 2-core CPU, EoMT's step is slower as one forward of 8 images than
as two of 4; benchmarks/RESULTS.md).

"ours" is `gd_hf.run.step.train_step` exactly as the loop runs it (autocast context, loss terms, backward,
gradient clipping, AdamW step, schedule step, one host sync for logging). "bare" is
`model(pixel_values, mask_labels, class_labels).loss.backward()` plus `optimizer.step()` — the least any loop
must do. Both run interleaved on one batch, after warm-up; the medians and their ratio are printed
(goal: ratio <= 1.10).
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

from gd_hf.config import load_recipe
from gd_hf.data.coco import load_coco, to_hf_dataset
from gd_hf.data.loading import (
    LabeledTrainDataset,
    StepBatchSampler,
    UnlabeledTrainDataset,
    collate_train,
    collate_unlabeled,
)
from gd_hf.data.synthetic import generate
from gd_hf.method import GuidedDistillation
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models import build_model, family_for
from gd_hf.run.optim import build_lr_scheduler, build_optimizer
from gd_hf.run.step import UpdateUndo, train_step

ROOT = Path(__file__).resolve().parents[1]


def gd_hf_step(model, batch, unlabeled, optimizer, scheduler, accelerator, grad_clip, method, undo) -> None:
    """One step as the loop runs it (with the recipe's `UpdateUndo` copy of the weights and optimizer state):
    supervised without a teacher, else distillation + the EMA update (an EMA-phase step)."""
    step = method.ssl.burn_in_steps + 1  # in the EMA phase (after the copy), EoMT mid-annealing in the demo
    scheduled = method.start_step(step, accelerator.unwrap_model(model)).scheduled
    if method.teacher is None:
        train_step(model, [batch], optimizer, scheduler, accelerator, grad_clip, method, undo=undo, scheduled=scheduled)
    else:
        train_step(model, [batch], optimizer, scheduler, accelerator, grad_clip, method, [unlabeled], undo,
                   scheduled=scheduled)  # fmt: skip
        method.after_step(method.ssl.burn_in_steps, accelerator.unwrap_model(model), update_skipped=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo_synthetic.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    parser.add_argument("--distill", action="store_true", help="time a Guided Distillation step instead")
    parser.add_argument("--bare-one-forward", action="store_true", help="with --distill: the bare step's student "
                        "sees the labeled and strong images in one forward, as gd_hf's does (one DDP forward)")  # fmt: skip
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synthetic", train=8, val=1, size=recipe.data.synthetic_image_size)
        source = load_coco(root / "annotations" / "instances_train.json", root / "train")
        torch.manual_seed(0)
        model = build_model(recipe.model, source.id2label)
        family = family_for(recipe)
        divisor = family.padding_divisor(model)
        dataset = LabeledTrainDataset(to_hf_dataset(source), recipe.data)
        indices = next(iter(StepBatchSampler(len(dataset), recipe.train.batch_size, seed=0)))
        batch = collate_train([dataset[i] for i in indices], divisor, family.black_padding)
        unlabeled_set = UnlabeledTrainDataset(to_hf_dataset(source, with_labels=False), recipe.data)
        unlabeled = collate_unlabeled([unlabeled_set[i] for i in indices], divisor, family.black_padding)
    ssl = dataclasses.replace(recipe.ssl, enabled=True, pseudo_label_score_threshold=0.0)
    teacher = EmaTeacher(copy.deepcopy(model), family.scheduled_buffers) if args.distill else None
    method = (GuidedDistillation(ssl, family, teacher) if teacher is not None
              else GuidedDistillation.supervised(family))  # fmt: skip

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_lr_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    undo = UpdateUndo(optimizer) if recipe.train.undo_nonfinite_updates else None
    model.train()
    device = accelerator.device
    bare_inputs = {
        "pixel_values": batch["pixel_values"].to(device),
        "mask_labels": [m.to(device) for m in batch["mask_labels"]],
        "class_labels": [c.to(device) for c in batch["class_labels"]],
    }

    if teacher is not None:
        teacher.to(device)
        weak = unlabeled["weak_pixel_values"].to(device)
        strong = unlabeled["strong_pixel_values"].to(device)
        # Fixed targets for the bare student pass on the strong view: the teacher's pseudo labels of the weak view,
        # made once, so both sides match and score the same targets (their count drives the matcher's cost).
        method.start_step(method.ssl.burn_in_steps + 1, accelerator.unwrap_model(model))
        pseudo = method.pseudo_labels(weak)
        strong_targets = {"mask_labels": pseudo.mask_labels, "class_labels": pseudo.class_labels}

    def bare() -> None:
        if teacher is not None:
            with torch.no_grad():
                teacher.model(pixel_values=weak)
        if teacher is not None and args.bare_one_forward:  # labeled + strong in one forward, as gd_hf's step
            model(pixel_values=torch.cat([bare_inputs["pixel_values"], strong]),
                  mask_labels=bare_inputs["mask_labels"] + strong_targets["mask_labels"],
                  class_labels=bare_inputs["class_labels"] + strong_targets["class_labels"]).loss.backward()  # fmt: skip
        else:
            model(**bare_inputs).loss.backward()
            if teacher is not None:
                model(pixel_values=strong, **strong_targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def ours() -> None:
        gd_hf_step(model, batch, unlabeled, optimizer, scheduler, accelerator, recipe.train.grad_clip, method,
                   undo)  # fmt: skip

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        bare(), ours()
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for _ in range(args.steps):  # interleaved so drift in machine load hits both alike
        times["bare"].append(timed(bare))
        times["ours"].append(timed(ours))
    bare_median, ours_median = statistics.median(times["bare"]), statistics.median(times["ours"])
    print(
        f"step: {'guided distillation' if teacher is not None else 'supervised'}, device: {device}, torch threads: {torch.get_num_threads()}, batch: {recipe.train.batch_size}, "
        f"model: {recipe.model.family}, crop: {recipe.data.crop_size}, params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
    )
    print(f"bare forward+backward+step: {bare_median * 1000:8.1f} ms (median of {args.steps})")
    print(f"gd_hf train_step:           {ours_median * 1000:8.1f} ms")
    print(f"ratio ours / bare:          {ours_median / bare_median:8.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
