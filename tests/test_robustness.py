"""Bad steps and bad records: an infinite gradient with a finite loss skips the update while the schedule goes
on, a NaN on one process only is skipped on every process, and 50 bad records in a row stop the run."""

from __future__ import annotations

import copy
import math
import os
import socket

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from PIL import Image

import gd_hf.models.common as model_common
from gd_hf.config import DataConfig
from gd_hf.data.coco import FEATURES, DataError
from gd_hf.data.loading import MAX_CONSECUTIVE_BAD_RECORDS, LabeledTrainDataset, collate_train
from gd_hf.method import GuidedDistillation
from gd_hf.models import build_model
from gd_hf.models.mask2former import Mask2FormerFamily
from gd_hf.run.distributed import build_accelerator
from gd_hf.run.optim import build_lr_scheduler, build_optimizer, lr_factor
from gd_hf.run.step import train_step

from .conftest import demo_recipe, tiny_overrides
from .test_method_flow import ID2LABEL, rectangles

SUPERVISED = GuidedDistillation.supervised(Mask2FormerFamily())  # the loss of phase 1


def labeled_batch() -> dict:
    samples = []
    for seed in (1, 2):
        image, masks, classes = rectangles(seed, 2, 64, 64)
        samples.append({"image": image, "masks": masks, "classes": classes, "image_id": seed})
    return collate_train(samples, 32)


def tiny_model_and_optimizer(synthetic_root, tmp_path):
    recipe = demo_recipe(
        tiny_overrides(synthetic_root, tmp_path) + ["train.warmup_steps=3", "train.max_steps=10"],
    )
    torch.manual_seed(0)
    model = build_model(recipe.model, ID2LABEL)
    optimizer = build_optimizer(model, recipe.train)
    return recipe, model, optimizer, build_lr_scheduler(optimizer, recipe.train)


def test_an_infinite_gradient_with_a_finite_loss_skips_the_update_and_the_schedule_goes_on(synthetic_root, tmp_path):
    recipe, model, optimizer, scheduler = tiny_model_and_optimizer(synthetic_root, tmp_path)
    before = copy.deepcopy(model.state_dict())
    poisoned = next(p for p in model.parameters() if p.requires_grad)
    handle = poisoned.register_hook(lambda grad: torch.full_like(grad, math.inf))
    outcome = train_step(model, [labeled_batch()], optimizer, scheduler, Accelerator(cpu=True), 0.0, SUPERVISED)
    handle.remove()
    logged = outcome.logged
    assert math.isfinite(logged["loss"]) and not math.isfinite(logged["grad_norm"])
    assert logged["nonfinite"] == 1.0 and outcome.skipped and not outcome.undone and not outcome.weights_nonfinite
    # The log holds metrics only: how the update went is the outcome's, not keys to pop.
    assert not {"finite_losses", "update_undone", "weights_nonfinite"} & set(logged)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter moved, not even the finite ones
    assert all(not state for state in optimizer.state.values())  # nor did Adam's moments start
    # The schedule is a function of the step: a skipped step still advances it.
    assert scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(recipe.train.lr * lr_factor(1, recipe.train))
    logged = train_step(model, [labeled_batch()], optimizer, scheduler, Accelerator(cpu=True), 0.0, SUPERVISED).logged
    assert logged["nonfinite"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the next step updates
    assert optimizer.param_groups[0]["lr"] == pytest.approx(recipe.train.lr * lr_factor(2, recipe.train))


def _step_with_nan_on_rank_1(rank: int, port: int, recipe, out_file: str, poison: str = "nan") -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    accelerator = build_accelerator(recipe)  # as a run builds it (DDP allows unused parameters)
    assert accelerator.num_processes == 2
    torch.manual_seed(0)
    model = build_model(recipe.model, ID2LABEL)
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_lr_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    real_loss_terms = model_common.loss_terms

    def nan_on_rank_1(*args, **kwargs):
        terms = real_loss_terms(*args, **kwargs)
        if rank == 1 and poison == "nan":  # its gradient is NaN too
            terms["loss_dice"] = terms["loss_dice"] * math.nan
        if rank == 1 and poison == "inf_constant":  # its gradient stays finite: only the loss says so
            terms["loss_dice"] = terms["loss_dice"] + torch.tensor(math.inf)
        return terms

    model_common.loss_terms = nan_on_rank_1
    logged = train_step(model, [labeled_batch()], optimizer, scheduler, accelerator, 0.0, SUPERVISED).logged
    after = accelerator.unwrap_model(model).state_dict()
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    torch.save({"logged": logged, "moved": moved, "lr_step": scheduler.last_epoch}, f"{out_file}.{rank}")
    accelerator.wait_for_everyone()
    # torch 2.13's gloo teardown can deadlock when the DDP reducer is freed with its process group (seen twice in
    # full-suite runs: the main thread joins a gloo worker under the GIL while the worker waits for the GIL to
    # free a tensor). The results are on disk and both ranks are past their collectives: leave at once.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("poison", ["nan", "inf_constant"])
def test_a_nan_on_one_process_only_skips_the_step_on_every_process(synthetic_root, tmp_path, poison):
    """Rank 1's loss is not finite, rank 0's is: both skip the update (otherwise the replicas would drift apart
    for good) and count it. With a NaN, DDP's all-reduced gradient is NaN on both; with an infinite constant
    term the gradient stays finite, and only the loss, whose finiteness is shared, tells rank 0."""
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "result"
    mp.spawn(_step_with_nan_on_rank_1, args=(port, recipe, str(out), poison), nprocs=2)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))
    assert math.isfinite(rank0["logged"]["loss"]) and not math.isfinite(rank1["logged"]["loss"])
    assert rank0["logged"]["nonfinite"] == rank1["logged"]["nonfinite"] == 1.0, (
        {k: rank0["logged"][k] for k in ("grad_norm", "nonfinite")},
        rank0["moved"],
        {k: rank1["logged"][k] for k in ("grad_norm", "nonfinite")},
        rank1["moved"],
    )
    assert not rank0["moved"] and not rank1["moved"]
    assert rank0["lr_step"] == rank1["lr_step"] == 1


def test_bad_records_are_skipped_until_50_in_a_row_stop_the_run(tmp_path):
    """`data.on_error: skip` steps over unreadable images to the next record, counting them; 50 in a row means
    the data set is broken, not a few files: the run stops naming the last one."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
    bad.write_bytes(b"not an image")
    empty = {"category": [], "rle_counts": [], "iscrowd": []}

    def records(paths):
        return datasets.Dataset.from_dict(
            {
                "image": [str(p) for p in paths],
                "image_id": list(range(1, len(paths) + 1)),
                "width": [32] * len(paths),
                "height": [32] * len(paths),
                "objects": [empty] * len(paths),
            },  # fmt: skip
            features=FEATURES,
        )

    data = DataConfig(crop_size=32, min_scale=1.0, max_scale=1.0, on_error="skip")
    dataset = LabeledTrainDataset(records([bad] * (MAX_CONSECUTIVE_BAD_RECORDS - 1) + [good]), data)
    sample = dataset[(0, 0)]
    assert sample["image_id"] == MAX_CONSECUTIVE_BAD_RECORDS and sample["skipped"] == MAX_CONSECUTIVE_BAD_RECORDS - 1
    broken = LabeledTrainDataset(records([bad] * MAX_CONSECUTIVE_BAD_RECORDS + [good]), data)
    with pytest.raises(DataError, match=f"{MAX_CONSECUTIVE_BAD_RECORDS} bad records in a row, the last: .*bad.png"):
        broken[(0, 0)]
    strict = LabeledTrainDataset(records([bad, good]), DataConfig(crop_size=32, on_error="raise"))
    with pytest.raises(DataError, match="bad.png"):
        strict[(0, 0)]
