"""Bad recipes: a bad value (`RECIPE_CASES`: exit code 2 naming the key, nothing written), a recipe file that
is not a mapping, unloadable or truncated pretrained weights, a teacher with non-finite weights."""

from __future__ import annotations

import json

import pytest
import torch

from gd_hf.models import build_model
from gd_hf.train import main

from .conftest import (
    EOMT_TINY,
    demo_recipe,
    launch,
    run_tiny,
    tiny_overrides,
)

RECIPE_CASES = [
    ("lr infinite", ["train.lr=.inf"], "train.lr: expected a finite number"),
    ("lr NaN", ["train.lr=.nan"], "train.lr: expected a finite number"),
    ("lr beyond float32", ["train.lr=1e39"], "train.lr must be in (0, 1]"),
    ("lr absurd", ["train.lr=10"], "train.lr must be in (0, 1]"),
    ("ema decay NaN", ["ssl.ema_decay=.nan"], "ssl.ema_decay: expected a finite number"),
    ("eval batch 0", ["eval.batch_size=0"], "eval.batch_size must be > 0"),
    ("eval max_images -1", ["eval.max_images=-1"], "eval.max_images"),
    ("eval edge 0", ["data.eval_shortest_edge=0"], "data.eval_shortest_edge must be > 0"),
    ("eval edges crossed", ["data.eval_longest_edge=32"], "data.eval_longest_edge"),
    ("synthetic count -3", ["data.synthetic_train_images=-3"], "data.synthetic_train_images"),
    ("output_dir empty", ["output_dir="], "output_dir must name a folder"),
    ("seed negative", ["seed=-1"], "seed must be in [0, 2**32)"),
    ("seed past numpy's", ["seed=4294967296"], "seed must be in [0, 2**32)"),
    ("batch absurd", ["train.batch_size=1000000000"], "train.batch_size must be in [1, 4096]"),
    ("register tokens absurd", ["model.eomt_register_tokens=100000"], "model.eomt_register_tokens must be <= 64"),
    ("backbone width absurd", ["model.backbone_hidden_size=10000000"], "model.backbone_hidden_size must be <= 4096"),
    ("class names beside a COCO JSON", ["data.category_names=[a, b]"], "data.category_names names classes for"),
    ("class file beside a COCO JSON", ["data.classes_file=classes.json"], "data.classes_file names classes for"),
    ("override not YAML", ["train.lr=[1"], "override `train.lr=[1`: its value is not valid YAML"),
    ("override a Python tag", ["train.lr=!!python/name:os.system"], "its value is not valid YAML"),
    ("split seed negative", ["data.split_seed=-2"], "data.split_seed"),
    ("hidden_dim 0", ["model.hidden_dim=0"], "model.hidden_dim"),
    ("decoder layers 0", ["model.decoder_layers=0"], "model.decoder_layers"),
    ("depth 0", ["model.backbone_depths=[1, 0, 1, 1]"], "model.backbone_depths"),
    ("negative loss weight", ["model.mask_weight=-1"], "loss weights"),
    ("zero no-object weight", ["model.no_object_weight=0"], "model.no_object_weight"),
    ("weight decay negative", ["train.weight_decay=-0.1"], "train.weight_decay"),
    ("teacher steps 0", ["ssl.enabled=true", "ssl.teacher_max_steps=0"], "ssl.teacher_max_steps"),
    ("repo id invalid", ["hub.repo_id=not a/valid id"], "hub.repo_id"),
    ("repo id three parts", ["hub.repo_id=a/b/c"], "hub.repo_id"),
    (
        "teacher ignored by train_teacher_first",
        ["ssl.enabled=true", "ssl.train_teacher_first=true", "ssl.teacher=some/teacher"],
        "ssl.train_teacher_first is true",
    ),
    ("model.pretrained missing", ["model.pretrained=/nonexistent/weights"], "model.pretrained="),
    ("unknown key", ["train.max_step=3"], "did you mean"),
    ("resume nonsense", ["resume=sometimes"], "resume: sometimes"),
    ("accumulation 0", ["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be > 0"),
    (
        "Swin heads that do not divide",
        ["model.backbone_num_heads=[3, 3, 3, 3]"],
        "model.backbone_num_heads must divide",
    ),
    ("Swin heads of 2 stages", ["model.backbone_num_heads=[1, 1]"], "must list 4 stages"),
    ("hidden_dim not a multiple of 32", ["model.hidden_dim=30"], "multiple of 32"),
    ("max_scale absurd", ["data.max_scale=1e30"], "data.max_scale must be <= 10"),
    ("crop absurd", ["data.crop_size=100000"], "data.crop_size must be <= 8192"),
    ("points absurd", ["model.train_num_points=100000000000"], "model.train_num_points"),
    ("queries absurd", ["model.num_queries=100000000"], "model.num_queries"),
    # The model family's own checks (`ModelFamily.recipe_problems`): run when training starts, before any work.
    ("unknown family", ["model.family=maskrcnn"], "model.family: 'maskrcnn' is not one of 'mask2former', 'eomt'"),
    ("layer lr decay for Mask2Former", ["train.layer_lr_decay=0.8"], "train.layer_lr_decay applies to EoMT's ViT only"),
    (
        "EoMT crop over its square",
        [*EOMT_TINY, "data.crop_size=128"],
        "data.crop_size must be <= model.eomt_image_size",
    ),
    ("EoMT heads", [*EOMT_TINY, "model.eomt_heads=3"], "model.eomt_heads must be > 0 and divide"),
]


@pytest.mark.parametrize("name, overrides, message", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_value_stops_at_start_naming_the_key(synthetic_root, tmp_path, capsys, name, overrides, message):
    out = tmp_path / "run"
    code = launch(synthetic_root, out, *overrides)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("- just\n- a list\n", "not a mapping"),
        ("42\n", "not a mapping"),
        (b"\xff\xfe\x00bin", "not valid YAML"),
        ("model: []\n", "model: expected a mapping"),  # not the defaults, silently
        ("train: 0\n", "train: expected a mapping"),
        ("data: false\n", "data: expected a mapping"),
        ("ssl: ''\n", "ssl: expected a mapping"),
        ("", "holds no recipe keys (it is empty or all comments)"),  # not the defaults, silently
        ("# a recipe to come\n# lr: 1e-4\n", "holds no recipe keys"),
        ("train:\n  lr: 1.0e-4\n  max_steps: 10\n  lr: 1.0e-3\n", "the key 'lr' is given twice in one section"),
        ("train:\n  ? [a, b]\n  : 1\n", "is not a plain value"),
    ],
    ids=[
        "a list",
        "a number",
        "binary",
        "a section that is a list",
        "a section that is 0",
        "a section false",
        "a section empty",
        "an empty file",
        "comments only",
        "a key twice",
        "a key that is a list",
    ],  # fmt: skip
)
def test_a_recipe_file_that_is_not_a_mapping_is_named(tmp_path, capsys, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(recipe) in err and "Traceback" not in err


def test_an_unloadable_pretrained_folder_is_one_line_not_a_traceback(synthetic_root, tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "swin", "embed_dim": 16')  # cut
    assert launch(synthetic_root, tmp_path / "run", f"model.pretrained={folder}") == 2
    err = capsys.readouterr().err
    assert "model.pretrained=" in err and "Traceback" not in err and len(err.splitlines()) < 8


def test_truncated_pretrained_weights_are_named(synthetic_root, tmp_path, capsys):
    from transformers import SwinConfig, SwinModel

    folder = tmp_path / "swin"
    SwinModel(SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert launch(synthetic_root, tmp_path / "run", f"model.pretrained={folder}") == 2
    err = capsys.readouterr().err
    assert "model.pretrained=" in err and str(folder) in err and "Traceback" not in err


def test_a_teacher_with_non_finite_weights_is_refused_at_start(synthetic_root, tmp_path, capsys):
    from gd_hf.models.mask2former import build_image_processor

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))
    names = [
        c["name"]
        for c in json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())["categories"]
    ]
    model = build_model(recipe.model, dict(enumerate(names)))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(tmp_path / "teacher")
    build_image_processor(model, recipe.data).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "ssl.enabled=true", f"ssl.teacher={tmp_path / 'teacher'}",
                    "ssl.unlabeled_batch_size=2") == 2  # fmt: skip
    assert "holds non-finite weights" in capsys.readouterr().err
    assert not out.exists()


def test_a_section_that_is_not_a_mapping_is_named_even_beside_an_override(tmp_path, capsys):
    """`model: [1]` with `model.hidden_dim=32` on the command line: the list was replaced by the override without
    a word; it is named instead."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [1]\n")
    assert main([str(recipe), "model.hidden_dim=32"]) == 2
    assert "model: expected a mapping of keys, got a list (override `model.hidden_dim=32`)" in capsys.readouterr().err


def test_yaml_merge_keys_still_work_and_may_be_overridden(tmp_path):
    """`<<: *defaults` (a merge key) is not a key given twice: its keys are overridden by the section's own."""
    from gd_hf.config import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  <<: {max_steps: 10, lr: 1.0e-4}\n  lr: 1.0e-3\n")
    loaded = load_recipe(recipe)
    assert loaded.train.max_steps == 10 and loaded.train.lr == 1.0e-3
