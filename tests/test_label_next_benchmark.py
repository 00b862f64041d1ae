"""benchmarks/label_next.py: a pick's gain is the mean of its paired gains (each training seed against the 2 % run
of the same training seed), and the multiple of random is computed from those means."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def label_next_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports ssl_gain's write_block, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("label_next_benchmark", ROOT / "benchmarks" / "label_next.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def heldout(folder: Path, best: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "heldout.json").write_text(json.dumps({"final": best - 1, "best": best}))


def test_gains_are_paired_by_training_seed_and_random_is_the_yardstick(label_next_benchmark, tmp_path):
    base, out = tmp_path / "ssl_gain", tmp_path / "label_next"
    annotations = base / "data_square" / "annotations" / "instances_train.json"
    annotations.parent.mkdir(parents=True)
    # images 1 and 2 have two objects each (one of image 2's is a crowd region, not drawn), image 3 has one
    objects = [(1, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    annotations.write_text(json.dumps({"annotations": [{"image_id": i, "iscrowd": c} for i, c in objects]}))
    # training seed 0's 2 % run scores 20, training seed 1000's scores 10: a gain measured against the wrong one
    # would be off by 10
    heldout(base / "mask2former_square" / "supervised_seed0", 20.0)
    heldout(out / "square" / "base_seed0_t1" / "supervised", 10.0)
    picks = {"random": ([1], 21.0, 12.0), "near_threshold": ([2, 3], 23.0, 13.0)}
    for strategy, (added, after_0, after_1) in picks.items():
        folder = out / "square" / f"{strategy}_seed0"
        heldout(folder / "supervised", after_0)
        heldout(folder / "supervised_t1", after_1)
        (folder / "job").mkdir()
        (folder / "job" / "split.json").write_text(json.dumps({"added_image_ids": added}))
    args = argparse.Namespace(
        sets=["square"], seeds=[0], strategies=["near_threshold", "random"], train_seeds=2, guided=False, count=24,
        base=str(base), out=str(out),
    )  # fmt: skip
    text = label_next_benchmark.table(args)
    assert "2 training seeds per pick" in text
    # random: (21 - 20 + 12 - 10) / 2 = +1.5 over 2 objects; near_threshold: (3 + 3) / 2 = +3 over 2 objects
    assert "| random | 16.50 | +1.50 ± 0.00 (+1.50) | +0.062 | +0.7500 |  |  |" in text
    assert "| near_threshold | 18.00 | +3.00 ± 0.00 (+3.00) | +0.125 | +1.5000 | +1.50 (+1.50) | 2.00 |" in text
    # the goal's figure, over every (set, arm, seed) cell: 3 / 1.5 per image, (3 / 2) / (1.5 / 2) per object
    assert "| near_threshold | +3.00 (1; random +1.50) | 2.00 | 2.00 | 1 of 1 |" in text
    assert "`near_threshold` at 2.00x random's gain per image (goal >= 1.5x: met" in text

    # a training seed not yet scored is left out of its pick's mean, not counted as 0
    (out / "square" / "random_seed0" / "supervised_t1" / "heldout.json").unlink()
    text = label_next_benchmark.table(args)
    assert "| random | 21.00 | +1.00 ± 0.00 (+1.00) |" in text and "at 3.00x random's" in text
    # random's gain at or below 0: no multiple, no verdict
    heldout(out / "square" / "random_seed0" / "supervised", 19.0)
    text = label_next_benchmark.table(args)
    assert "| near_threshold | +3.00 (1; random -1.00) | n/a: random's mean gain <= 0 |" in text
    assert "Best on average" not in text


def test_a_training_seed_changes_the_seed_and_nothing_else(label_next_benchmark):
    overrides = ["output_dir=x", "seed=2", "data.split_seed=2", "train.max_steps=500"]
    assert label_next_benchmark.with_seed(overrides, 1002) == ["data.split_seed=2", "train.max_steps=500", "seed=1002"]
