"""Shared fixtures: a tiny synthetic COCO set written once per session, and a tiny recipe over it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
import pytest

# Tests never touch the network: everything they load they wrote themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# data.records_cache: auto writes under the datasets cache; tests keep theirs out of the user's home.
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="gd_hf_tests_datasets_")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

from gd_hf.config import Recipe, load_recipe  # noqa: E402
from gd_hf.data.synthetic import generate  # noqa: E402
from tests.hub_standin import TOKEN, HubStandIn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = str(ROOT / "recipes" / "demo_synthetic.yaml")


def demo_recipe(overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The demo recipe with `overrides`: the one place tests build it (most pass `tiny_overrides`)."""
    return load_recipe(DEMO_RECIPE, list(overrides))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """24 train + 8 val images of 64 px."""
    return generate(tmp_path_factory.mktemp("data") / "synthetic", train=24, val=8, size=64, seed=1)


@pytest.fixture(scope="session")
def varied_root(tmp_path_factory) -> Path:
    """24 train + 8 val images of mixed sizes and aspect ratios (longer side 48-80 px): the paper's data path."""
    return generate(tmp_path_factory.mktemp("data") / "varied", train=24, val=8, size=64, seed=2, varied_sizes=True)


# With `varied_root`: large-scale jitter as the paper recipes (0.1-2.0), so crops are smaller than crop_size,
# non-square, and labeled and unlabeled batches pad to different sizes.
PAPER_JITTER = ["data.min_scale=0.3", "data.max_scale=2.0"]


def tiny_overrides(root: Path, output_dir: Path) -> list[str]:
    """Recipe overrides for a ~1 M parameter Swin Mask2Former on the 64 px synthetic set."""
    return [
        f"output_dir={output_dir}",
        f"data.train_images={root / 'train'}",
        f"data.train_annotations={root / 'annotations' / 'instances_train.json'}",
        f"data.val_images={root / 'val'}",
        f"data.val_annotations={root / 'annotations' / 'instances_val.json'}",
        "data.generate_synthetic=false",
        "data.labeled_percent=100",
        "ssl.enabled=false",  # the demo recipe runs the whole method; tests switch it on where they mean it
        # The tests' 2-step teachers would be stopped by the teacher check (tests/test_teacher_check.py covers it).
        "ssl.teacher_check=warn",
        "ssl.train_teacher_first=false",
        "data.crop_size=64",
        "data.eval_shortest_edge=64",
        "data.eval_longest_edge=64",
        "data.num_workers=0",
        "model.backbone_hidden_size=16",
        "model.backbone_depths=[1, 1, 1, 1]",
        "model.backbone_num_heads=[1, 1, 2, 2]",
        "model.hidden_dim=32",
        "model.encoder_layers=1",
        "model.decoder_layers=2",
        "model.num_queries=8",
        "model.train_num_points=256",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        "eval.batch_size=4",
        "eval.top_k=10",
    ]


# With `tiny_overrides`: an EoMT instead (a 3-layer ViT of width 32 whose last 2 blocks take the queries, 64 px
# squares of 4 x 4 patches), about the tiny Mask2Former's cost.
EOMT_TINY = [
    "model.family=eomt",
    "model.eomt_image_size=64",
    "model.eomt_hidden_size=32",
    "model.eomt_layers=3",
    "model.eomt_heads=2",
    "model.eomt_query_blocks=2",
    "model.eomt_register_tokens=1",
]


@pytest.fixture
def tiny_recipe(synthetic_root, tmp_path) -> Recipe:
    return demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process training run builds its own Accelerator (accelerate keeps a process-wide singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# Phase 1 then phases 2-3 in one launch, a couple of steps each (the tiny model of `tiny_overrides`).
ONE_LAUNCH_SSL = [
    "ssl.enabled=true",
    "ssl.train_teacher_first=true",
    "ssl.teacher_max_steps=2",
    "ssl.burn_in_steps=1",
    "ssl.unlabeled_batch_size=2",
    "train.max_steps=2",
]


@pytest.fixture
def hub(monkeypatch):
    """The stand-in Hub as huggingface_hub's endpoint, with a token in the environment."""
    with HubStandIn() as stand_in:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stand_in.url)
        # The suite runs offline; the stand-in on 127.0.0.1 is the only "Hub" these tests can reach.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        stand_in.token = TOKEN  # requests without this bearer token are refused, as on the Hub
        # Large files take the LFS path (preupload answers `lfs`, batch, PUT, verify, commit pointer). The Xet path
        # that hf_xet would take first talks to a content-addressed store the stand-in does not emulate.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        yield stand_in


# The bad-input tests' helpers (tests/test_bad_*.py).


def launch(root: Path, out: Path, *extra: str) -> int:
    """`python -m gd_hf.train` on the demo recipe at test size, without a records cache: its exit code."""
    from gd_hf.train import main

    return main([DEMO_RECIPE, *tiny_overrides(root, out), "data.records_cache=null", *extra])


def main_outcome(code: int) -> str:
    from gd_hf.train import EXIT_OUTCOMES

    return f"{EXIT_OUTCOMES[code]} (exit code {code})"


def run_tiny(root: Path, out: Path, *extra: str) -> int:
    """`python -m gd_hf.train` on the demo recipe at test size: its exit code."""
    from gd_hf.train import main

    return main([DEMO_RECIPE, *tiny_overrides(root, out), *extra])


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
