"""Units that behave differently under DDP, run in two real gloo processes on the CPU."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gd_hf.models.common import use_mean_mask_count_across_processes

from .conftest import demo_recipe

pytestmark = pytest.mark.slow  # real gloo processes and tiny-model training steps


def _num_masks_on_rank(rank: int, init_file: str, counts: list[int], results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(counts))
    try:
        # The patch only needs the criterion: a stand-in model object carrying one.
        model = SimpleNamespace(criterion=SimpleNamespace())
        use_mean_mask_count_across_processes(model)
        class_labels = [torch.zeros(counts[rank], dtype=torch.long)]
        results[rank] = float(model.criterion.get_num_masks(class_labels, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def test_every_process_normalises_by_the_mean_mask_count(tmp_path):
    """3 target masks on one process and 5 on the other: both divide the mask losses by 4 (detectron2's rule),
    not by 4 / 2 (transformers' double division) or by their own count."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_num_masks_on_rank, args=(str(tmp_path / "init"), [3, 5], results), nprocs=2, join=True)
    assert dict(results) == {0: 4.0, 1: 4.0}


_REAL_RAND = torch.rand


def _fixed_points(self, logits, uncertainty_function, num_points, oversample_ratio, importance_sample_ratio):
    """The loss's point sampling with its randomness fixed: the same points for every mask, whatever the batch
    it is in (the real one draws per call, so a split batch draws other points)."""
    grid = _REAL_RAND(num_points, 2, generator=torch.Generator().manual_seed(0)).to(logits.device)
    return grid.expand(logits.shape[0], num_points, 2)


def _same_draw_for_the_same_shape(*size, generator=None, device=None, **kwargs):
    """torch.rand for the Hungarian matcher, which draws its points image by image: the same values for every
    image, so that image k's matching does not depend on the images drawn before it."""
    shape = size[0] if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size
    return _REAL_RAND(*shape, generator=torch.Generator().manual_seed(1), **kwargs).to(device or "cpu")


def _fix_loss_randomness() -> None:
    from transformers.models.mask2former import modeling_mask2former

    modeling_mask2former.Mask2FormerLoss.sample_points_using_uncertainty = _fixed_points
    modeling_mask2former.torch.rand = _same_draw_for_the_same_shape  # (the module's `torch` is torch itself)


def four_images() -> list[dict]:
    """Mask counts per image 1, 3 | 2, 2: unequal per image, equal per half. (The class term is a weighted mean
    whose weights count matched queries, so it splits exactly only when each half has as many masks; the mean
    mask count over processes with unequal counts is the first test.)"""
    from tests.test_method_flow import rectangles

    samples = []
    for seed, count in zip(range(4), (1, 3, 2, 2)):
        image, masks, classes = rectangles(seed, count, 64, 64)
        samples.append({"image": image, "masks": masks, "classes": classes, "image_id": seed})
    return samples


def _deterministic(model):
    """Train mode (DDP reduces gradients in it) without its random parts: drop-path and dropout off."""
    model.train()
    for module in model.modules():
        for name in ("drop_prob", "p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def _gradients(model, batch) -> list[torch.Tensor]:
    from gd_hf.models.mask2former import Mask2FormerFamily

    family = Mask2FormerFamily()
    predictions = family.forward(model, batch["pixel_values"])
    inner = model.module if hasattr(model, "module") else model
    loss = sum(family.loss(inner, predictions, batch["mask_labels"], batch["class_labels"]).values())
    loss.backward()
    return [p.grad.clone() for p in inner.parameters() if p.grad is not None]


def _half_batch_gradients_on_rank(rank: int, init_file: str, state_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    _fix_loss_randomness()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from gd_hf.models import build_model

        saved = torch.load(state_file, weights_only=False)
        model = _deterministic(build_model(saved["model_config"], saved["id2label"]))
        model.load_state_dict(saved["state"])
        use_mean_mask_count_across_processes(model)
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as gd_hf.train
        rows = slice(2 * rank, 2 * rank + 2)
        batch = saved["batch"]
        half = {
            "pixel_values": batch["pixel_values"][rows],
            "mask_labels": batch["mask_labels"][rows],
            "class_labels": batch["class_labels"][rows],
        }
        torch.save(_gradients(model, half), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_of_b_images_give_the_gradients_of_one_process_of_2b(synthetic_root, tmp_path, monkeypatch):
    """With the loss's and the matcher's point sampling fixed, DDP's averaged gradients of 2 x 2 images equal one
    process's gradients of the 4 images (mask count averaged over processes, gradients averaged by DDP)."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    from gd_hf.data.loading import collate_train
    from gd_hf.models import build_model
    from tests.conftest import tiny_overrides
    from tests.test_method_flow import ID2LABEL

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    torch.manual_seed(0)
    model = _deterministic(build_model(recipe.model, ID2LABEL))
    batch = collate_train(four_images(), 32)
    state_file = tmp_path / "state.pt"
    torch.save(
        {"model_config": recipe.model, "id2label": ID2LABEL, "state": model.state_dict(), "batch": batch}, state_file
    )
    monkeypatch.setattr(Mask2FormerLoss, "sample_points_using_uncertainty", _fixed_points)
    monkeypatch.setattr(torch, "rand", _same_draw_for_the_same_shape)
    single = _gradients(model, batch)
    monkeypatch.undo()
    out = tmp_path / "grads"
    mp.spawn(_half_batch_gradients_on_rank, args=(str(tmp_path / "init"), str(state_file), str(out)), nprocs=2)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert len(single) == len(rank0) > 0
    for expected, got0, got1 in zip(single, rank0, rank1):
        assert torch.equal(got0, got1)  # DDP: every rank steps with the same averaged gradient
        torch.testing.assert_close(got0, expected, atol=max(1e-6, 1e-5 * float(expected.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_two_accumulated_micro_batches_give_the_step_of_one_batch(
    synthetic_root, tmp_path, monkeypatch, mixed_precision
):
    """`train.gradient_accumulation_steps=2`: the gradients gd_hf's `train_step` steps with, for two micro-batches of
    2 images, equal those of one batch of 4 (point sampling fixed; as many masks per micro-batch, see above):
    within float rounding in fp32, within bf16's precision under autocast."""
    from accelerate import Accelerator
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    from gd_hf.data.loading import collate_train
    from gd_hf.method import GuidedDistillation
    from gd_hf.models import build_model
    from gd_hf.models.mask2former import Mask2FormerFamily
    from gd_hf.run.optim import build_lr_scheduler, build_optimizer
    from gd_hf.run.step import train_step
    from tests.conftest import tiny_overrides
    from tests.test_method_flow import ID2LABEL

    monkeypatch.setattr(Mask2FormerLoss, "sample_points_using_uncertainty", _fixed_points)
    monkeypatch.setattr(torch, "rand", _same_draw_for_the_same_shape)
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    torch.manual_seed(0)
    model0 = _deterministic(build_model(recipe.model, ID2LABEL))
    samples = four_images()

    def stepped_gradients(micro_batches):
        import copy

        model = copy.deepcopy(model0)
        optimizer = build_optimizer(model, recipe.train)
        seen = {}
        optimizer.register_step_pre_hook(
            lambda *_: seen.update(grads=[p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
        train_step(model, micro_batches, optimizer, build_lr_scheduler(optimizer, recipe.train), accelerator, 0.0,
                   GuidedDistillation.supervised(Mask2FormerFamily()))  # fmt: skip
        return seen["grads"]

    whole = stepped_gradients([collate_train(samples, 32)])
    accumulated = stepped_gradients([collate_train(samples[:2], 32), collate_train(samples[2:], 32)])
    assert len(whole) == len(accumulated) > 0
    whole, accumulated = torch.cat([g.flatten() for g in whole]), torch.cat([g.flatten() for g in accumulated])
    error = float((accumulated - whole).norm() / whole.norm())
    # fp32: float rounding; bf16: ~3 significant digits, rounded op by op (halving a micro-batch's gradient,
    # the bug this guards against, would be an error of ~0.5).
    assert error < (1e-5 if mixed_precision == "no" else 0.05), error
