"""The hostile-input battery: bad records, bad recipes and bad files, each a row of a table, each ending in a clear
error (exit code 2 naming the record or key, nothing written) or in a record skipped and counted, never in a
traceback, a crash hours in, or a silent wrong result. The run-time faults (non-finite weights, damaged
checkpoints, torn logs, a second launch, a changed recipe) follow, one test each."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pycocotools import mask as mask_utils

from gd_hf.data.coco import DataError, load_coco
from gd_hf.train import main
from tests.conftest import EOMT_TINY, ROOT, tiny_overrides

from .conftest import DEMO_RECIPE, demo_recipe


@pytest.fixture(scope="module")
def coco(synthetic_root) -> dict:
    return json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())


def launch(root: Path, out: Path, *extra: str) -> int:
    return main([DEMO_RECIPE, *tiny_overrides(root, out), "data.records_cache=null", *extra])


def first_ann(c: dict) -> dict:
    return c["annotations"][0]


def image_size(c: dict) -> tuple[int, int]:
    image = next(i for i in c["images"] if i["id"] == first_ann(c)["image_id"])
    return image["height"], image["width"]


def _set(path: list, value):
    def mutate(c: dict) -> None:
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


# --- the table: a bad COCO training file -> exit code 2, a message naming the record, nothing written ---------

COCO_CASES = [
    ("image id a string", _set(["images", 0, "id"], "abc"), "ids are integers"),
    ("image id a list", _set(["images", 0, "id"], [1]), "ids are integers"),
    ("image id a boolean", _set(["images", 0, "id"], True), "ids are integers"),
    ("image id past int64", _set(["images", 0, "id"], 2**63), "ids are integers"),
    ("image id 1e300", _set(["images", 0, "id"], 1e300), "ids are integers"),
    ("image record a number", _set(["images", 0], 7), "not an object"),
    ("image record without file_name", lambda c: c["images"][0].pop("file_name"), r"lacks \['file_name'\]"),
    ("file_name a number", _set(["images", 0, "file_name"], 12), "file_name 12"),
    ("file_name empty", _set(["images", 0, "file_name"], ""), "file_name ''"),
    ("width a word", _set(["images", 0, "width"], "wide"), "positive integers"),
    ("width zero", _set(["images", 0, "width"], 0), "positive integers"),
    ("height negative", _set(["images", 0, "height"], -64), "positive integers"),
    ("width fractional", _set(["images", 0, "width"], 63.5), "positive integers"),
    ("absurd size", lambda c: c["images"][0].update(width=10**6, height=10**6), "more than any image"),
    ("annotation a string", _set(["annotations", 0], "x"), "not an object"),
    ("annotation image_id a list", lambda c: first_ann(c).update(image_id=[1]), "points at image id"),
    ("annotation image_id unknown", lambda c: first_ann(c).update(image_id=-7), "points at image id -7"),
    ("annotation category_id a string", lambda c: first_ann(c).update(category_id="cat"), "category_id 'cat'"),
    ("annotation category_id a dict", lambda c: first_ann(c).update(category_id={"a": 1}), "category_id"),
    ("iscrowd a word", lambda c: first_ann(c).update(iscrowd="yes"), "iscrowd 'yes'"),
    ("iscrowd 2", lambda c: first_ann(c).update(iscrowd=2), "iscrowd 2"),
    ("iscrowd a list", lambda c: first_ann(c).update(iscrowd=[1]), "iscrowd"),
    ("category without id", lambda c: c["categories"][0].pop("id"), "integer `id`"),
    ("category id a string", _set(["categories", 0, "id"], "one"), "integer `id`"),
    ("category a list", _set(["categories", 0], [1, "a"]), "integer `id`"),
    ("categories empty", _set(["categories"], []), "lists no categories"),
    ("images not a list", _set(["images"], {"a": 1}), "no `images` list"),
    ("a JSON list", lambda c: c.update(__root_list__=True), "not a JSON object"),
    ("two categories, one id", lambda c: c["categories"].append(dict(c["categories"][0])), "more than once"),
    ("two images, one id", lambda c: c["images"].append(dict(c["images"][0])), "appears twice"),
]


@pytest.mark.parametrize("name, mutate, message", COCO_CASES, ids=[c[0] for c in COCO_CASES])
def test_bad_coco_record_stops_at_start_naming_it(synthetic_root, coco, tmp_path, capsys, name, mutate, message):
    bad = copy.deepcopy(coco)
    mutate(bad)
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps([bad] if bad.pop("__root_list__", False) else bad))
    out = tmp_path / "run"
    assert launch(synthetic_root, out, f"data.train_annotations={annotations}") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert str(annotations) in err or "instances_train.json" in err  # the file is named
    assert err.strip().splitlines()[-1] == "gd_hf.train: " + main_outcome(2)
    assert not out.exists()


def main_outcome(code: int) -> str:
    from gd_hf.train import EXIT_OUTCOMES

    return f"{EXIT_OUTCOMES[code]} (exit code {code})"


# --- the table: an unusable segmentation -> skipped at start and counted (the image keeps its other objects) ---


def _rle(c: dict, counts) -> None:
    height, width = image_size(c)
    first_ann(c)["segmentation"] = {"size": [height, width], "counts": counts}


SKIPPED_CASES = [
    ("RLE counts outside the alphabet", lambda c: _rle(c, "ab!~~~"), "not in its alphabet"),
    ("RLE counts past h*w", lambda c: _rle(c, "1" * 60), "RLE counts cover"),
    ("RLE counts short of h*w", lambda c: _rle(c, "0"), "RLE counts cover 0 pixels"),
    ("RLE counts cut mid-number", lambda c: _rle(c, "P"), "middle of a number"),
    ("RLE counts non-ASCII", lambda c: _rle(c, "é1"), "non-ASCII"),
    ("uncompressed RLE of strings", lambda c: _rle(c, ["1", "2"]), "non-negative integers"),
    ("uncompressed RLE negative", lambda c: _rle(c, [-5, 4101]), "non-negative integers"),
    ("RLE counts a number", lambda c: _rle(c, 12), "not a string or a list"),
    ("RLE size a word", lambda c: first_ann(c).update(segmentation={"size": "big", "counts": "00"}), "RLE size"),
    ("polygon of words", lambda c: first_ann(c).update(segmentation=[["a"] * 6]), "finite numbers"),
    ("polygon at 1e7", lambda c: first_ann(c).update(segmentation=[[0, 0, 1e7, 0, 1e7, 1e7]]), "far outside"),
    ("polygon at 1e12", lambda c: first_ann(c).update(segmentation=[[0, 0, 1e12, 5, 3, 1e12]]), "far outside"),
    ("segmentation a string", lambda c: first_ann(c).update(segmentation="mask"), "neither a polygon"),
]


@pytest.mark.parametrize("name, mutate, reason", SKIPPED_CASES, ids=[c[0] for c in SKIPPED_CASES])
def test_unusable_segmentation_is_skipped_at_start_and_counted(synthetic_root, coco, tmp_path, name, mutate, reason):
    bad = copy.deepcopy(coco)
    mutate(bad)
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps(bad))
    source = load_coco(annotations, synthetic_root / "train")
    assert source.skipped_annotations == 1
    assert any(reason in why for why in source.skip_reasons), source.skip_reasons
    objects = sum(len(a) for a in source.annotations.values())
    assert objects == len(coco["annotations"]) - 1


def test_compressed_rle_check_accepts_what_pycocotools_writes():
    import numpy as np

    from gd_hf.data.masks import compressed_rle_problem

    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (5, 7), (64, 48), (300, 2)]:
        mask = np.asfortranarray(rng.random((height, width)) > 0.6).astype(np.uint8)
        counts = mask_utils.encode(mask)["counts"]
        assert compressed_rle_problem(counts, height, width) is None
        assert compressed_rle_problem(counts.decode(), height, width) is None
        assert "cover" in compressed_rle_problem(counts, height + 1, width)


def test_a_record_whose_mask_cannot_be_decoded_is_skipped_and_counted_mid_run(synthetic_root):
    """Records that were not checked at start (shards, hub data sets, streams) fail when decoded: that is a bad
    record for `data.on_error`, not a crash at the same step of every relaunch."""
    import datasets

    from gd_hf.config import DataConfig
    from gd_hf.data.coco import load_coco, to_hf_dataset
    from gd_hf.data.loading import LabeledTrainDataset

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    rows = [row for row in records.to_list() if row["objects"]["rle_counts"]]
    rows[0]["objects"]["rle_counts"][0] = "1" * 40  # counts past h*w: pycocotools raises when decoding
    rows[1]["objects"]["rle_counts"][0] = "0"  # counts short of h*w: pycocotools returns garbage silently
    broken = datasets.Dataset.from_list(rows, features=records.features)
    data = DataConfig(crop_size=64, min_scale=1.0, max_scale=1.0, on_error="skip")
    dataset = LabeledTrainDataset(broken, data)
    sample = dataset[(0, 0)]
    assert sample["image_id"] == rows[2]["image_id"] and sample["skipped"] == 2 and dataset.skips.total == 2
    assert dataset[(1, 0)]["image_id"] == rows[2]["image_id"]  # the same on every read (a resume included)
    with pytest.raises(DataError, match=r"image id .* a mask cannot be decoded: object 0: RLE counts cover"):
        LabeledTrainDataset(broken, DataConfig(crop_size=64, on_error="raise"))[(0, 0)]


# --- the table: a bad recipe -> exit code 2 naming the key, nothing written ------------------------------------

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
    ("seed negative", ["seed=-1"], "seed must be >= 0"),
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
    ],
    ids=[
        "a list",
        "a number",
        "binary",
        "a section that is a list",
        "a section that is 0",
        "a section false",
        "a section empty",
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


# --- val images: read at start, not at the first evaluation ----------------------------------------------------


def copy_set(root: Path, tmp_path: Path) -> Path:
    import shutil

    copied = tmp_path / "set"
    shutil.copytree(root, copied)
    return copied


@pytest.mark.parametrize("damage", ["truncated", "not an image", "wrong size"])
def test_a_bad_val_image_stops_the_run_before_anything_is_written(synthetic_root, tmp_path, capsys, damage):
    from PIL import Image

    root = copy_set(synthetic_root, tmp_path)
    val = sorted((root / "val").iterdir())[3]
    if damage == "truncated":
        val.write_bytes(val.read_bytes()[:300])
    elif damage == "not an image":
        val.write_text("this is not a PNG")
    else:
        Image.new("RGB", (50, 40)).save(val)
    out = tmp_path / "run"
    assert main([DEMO_RECIPE, *tiny_overrides(root, out), "train.eval_every=2"]) == 2
    err = capsys.readouterr().err
    assert "val images cannot be used" in err and val.name in err and "Traceback" not in err
    assert not out.exists()


# --- the CLIs --------------------------------------------------------------------------------------------------


def test_evaluate_on_a_file_without_images_is_an_error(synthetic_root, tmp_path, capsys):
    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.models import build_model
    from gd_hf.models.mask2former import build_image_processor

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))
    model = build_model(recipe.model, {0: "a", 1: "b", 2: "c", 3: "d"})
    model.save_pretrained(tmp_path / "model")
    build_image_processor(model, recipe.data).save_pretrained(tmp_path / "model")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert evaluate_main([str(tmp_path / "model"), str(empty), str(synthetic_root / "val")]) == 2
    assert "lists no images" in capsys.readouterr().err
    assert evaluate_main([str(tmp_path / "nothing"), str(empty), str(synthetic_root / "val")]) == 2


@pytest.mark.parametrize("percent", ["0", "150", "-1"])
def test_splits_refuses_percentages_outside_0_100_and_writes_nothing(synthetic_root, tmp_path, capsys, percent):
    from gd_hf.data.splits import main as splits_main

    out = tmp_path / "splits"
    annotations = str(synthetic_root / "annotations" / "instances_train.json")
    assert splits_main([annotations, "--out", str(out), "--percents", percent]) == 2
    assert "percentages must lie in (0, 100]" in capsys.readouterr().err
    assert not out.exists()


def test_predict_skips_a_decompression_bomb_and_predicts_the_rest(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from gd_hf.predict import predict

    Image.new("RGB", (300, 300), (200, 10, 10)).save(tmp_path / "huge.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 300x300 > 2x this: PIL's hard limit
    from gd_hf.config import ModelConfig
    from gd_hf.models import build_model

    model = build_model(ModelConfig(backbone_hidden_size=16, backbone_depths=[1, 1, 1, 1],
                                    backbone_num_heads=[1, 1, 2, 2], hidden_dim=32, encoder_layers=1,
                                    decoder_layers=2, num_queries=4), {0: "a"})  # fmt: skip
    results, failures = predict(model, [tmp_path / "huge.png", tmp_path / "small.png"], tmp_path / "out", 64, 64,
                                0.0, 2, 4, "cpu")  # fmt: skip
    assert [f.name for f, _ in failures] == ["huge.png"]
    assert (tmp_path / "out" / "small.png").is_file() and {r["file_name"] for r in results} == {
        str(tmp_path / "small.png")
    }


# --- the Swin of a from-scratch run learns from its objects, not from the padding ------------------------------


def test_a_half_padded_batch_gives_a_random_init_swin_an_ordinary_gradient(synthetic_root, tmp_path):
    """transformers initialises Swin's patch-embedding bias to 0: a zero-padded patch then embeds to an exact zero
    vector, and a LayerNorm over it scales the gradient by 1/sqrt(eps) (~1e8 here before the fix)."""
    from gd_hf.models import build_model

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model(recipe.model, {0: "a", 1: "b"})
        images = torch.randn(2, 3, 128, 128)
        norms = []
        for padded in (False, True):
            if padded:
                images[:, :, :, 64:] = 0  # half of each image is padding, as in a mixed-size batch
            masks = [torch.zeros(1, 128, 128), torch.zeros(1, 128, 128)]
            masks[0][0, 10:40, 10:40], masks[1][0, 20:50, 5:30] = 1, 1
            model.zero_grad()
            model(
                pixel_values=images, mask_labels=masks, class_labels=[torch.tensor([0]), torch.tensor([1])]
            ).loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
        assert norms[1] < 10 * norms[0], norms  # measured: within 2x of the unpadded batch (1e7x before)


# --- run-time faults -----------------------------------------------------------------------------------------


@pytest.fixture
def nan_after_third_update(monkeypatch):
    """AdamW's third step leaves a NaN in a weight although its loss and gradient were finite (as a far too high
    learning rate does)."""
    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)


def test_a_step_that_makes_weights_non_finite_is_taken_back(synthetic_root, tmp_path, caplog, nan_after_third_update):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    caplog.set_level("WARNING")
    assert launch(synthetic_root, out, "train.max_steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=5") == 0
    assert "step 3: its update made weights non-finite" in caplog.text
    checkpoints = out / "checkpoints"
    after = {n: load_file(checkpoints / f"step_0000000{n}" / "model.safetensors") for n in (2, 3, 4)}
    assert same_weights(after[3], after[2])  # step 3 was not taken: weights as after step 2
    assert not same_weights(after[4], after[3])  # and training went on
    optimizer_2 = torch.load(checkpoints / "step_00000002" / "optimizer.bin", weights_only=True)["state"]
    optimizer_3 = torch.load(checkpoints / "step_00000003" / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(optimizer_2[k][m], optimizer_3[k][m]) for k in optimizer_2 for m in optimizer_2[k])
    assert all(t.isfinite().all() for t in final_weights(out).values())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in logged if "nonfinite_steps" in r] == [0, 0, 1, 1, 1]


def test_without_undo_such_a_step_stops_the_run_and_nothing_non_finite_is_written(
    synthetic_root, tmp_path, capsys, nan_after_third_update
):
    import gd_hf.train as train_module

    out = tmp_path / "run"
    assert launch(synthetic_root, out, "train.max_steps=6", "train.checkpoint_every=1", "train.eval_every=2",
                  "train.undo_nonfinite_updates=false") == 4  # fmt: skip
    err = capsys.readouterr().err
    assert "the update of step 3 made weights non-finite" in err
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step_00000002'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert not (out / "final").exists()
    from safetensors.torch import load_file

    for folder in [out / "checkpoints" / "step_00000002", out / "best"]:
        weights = load_file(folder / "model.safetensors")
        assert all(t.isfinite().all() for t in weights.values())
    assert train_module.EXIT_OUTCOMES[4] in err.strip().splitlines()[-1]


def test_exports_and_checkpoints_refuse_non_finite_weights(synthetic_root, tmp_path):
    from gd_hf.hub.export import export_model
    from gd_hf.models import build_model
    from gd_hf.models.mask2former import build_image_processor
    from gd_hf.weights import NonFiniteWeightsError

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))
    model = build_model(recipe.model, {0: "a"})
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights"):
        export_model(model, build_image_processor(model, recipe.data), tmp_path / "final")
    assert not (tmp_path / "final").exists()


def run_tiny(root: Path, out: Path, *extra: str) -> int:
    return main([DEMO_RECIPE, *tiny_overrides(root, out), *extra])


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DAMAGES = [
    "truncated weights",
    "empty trainer state",
    "truncated optimizer",
    "unreadable RNG state",
    "missing optimizer",
    "missing schedule",
    "missing RNG state",
    "schedule holding code",
    "negative step",
    "optimizer holding code",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_ends_bitwise_the_same(
    synthetic_root, tmp_path, caplog, damage
):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    uninterrupted = final_weights(out)
    newest = out / "checkpoints" / "step_00000004"
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty trainer state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "truncated optimizer":
        optimizer = newest / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[:-100])
    elif damage == "unreadable RNG state":
        (newest / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    elif damage.startswith("missing"):
        name = {"missing optimizer": "optimizer.bin", "missing schedule": "gd_hf_state_0.pt"}.get(damage)
        (newest / (name or "random_states_0.pkl")).unlink()
    elif damage == "schedule holding code":
        torch.save({"lr_lambdas": [Payload(tmp_path / "pwned")]}, newest / "gd_hf_state_0.pt")
    elif damage == "optimizer holding code":
        torch.save({"state": {}, "param_groups": [Payload(tmp_path / "pwned")]}, newest / "optimizer.bin")
    else:
        state = json.loads((newest / "trainer_state.json").read_text())
        (newest / "trainer_state.json").write_text(json.dumps({**state, "step": -3}))
    caplog.set_level("WARNING")
    # The relaunch passes over step 4, resumes from step 3 and trains step 4 again: to the same weights.
    assert run_tiny(synthetic_root, out, "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    assert "step_00000004 cannot be resumed from" in caplog.text
    assert "resuming from" in caplog.text and "step_00000003, the newest checkpoint that reads whole" in caplog.text
    assert same_weights(final_weights(out), uninterrupted)
    assert all(t.isfinite().all() for t in uninterrupted.values())
    assert not (tmp_path / "pwned").exists()


class Payload:
    """A pickle that runs code when loaded without `weights_only`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.checkpoint_every=1") == 0
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "trainer_state.json").write_text("{")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 2
    assert "can be resumed from" in capsys.readouterr().err


def test_a_torn_last_log_line_is_dropped_at_relaunch(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 1.2')  # a kill (or a full disk) in the middle of an append
    caplog.set_level("WARNING")
    assert run_tiny(synthetic_root, out, "train.max_steps=4") == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert "which is not whole" in caplog.text


def test_a_malicious_pickle_in_a_checkpoint_is_not_run(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.checkpoint_every=1") == 0
    marker = tmp_path / "pwned"
    for checkpoint in (out / "checkpoints").iterdir():
        torch.save({"lr_lambdas": [Payload(marker)]}, checkpoint / "gd_hf_state_0.pt")  # the schedule's file
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 2
    err = capsys.readouterr().err
    assert "gd_hf_state_0.pt cannot be read (UnpicklingError" in err and "no checkpoint" in err
    assert not marker.exists()


def test_a_relaunch_that_changes_what_is_trained_stops_naming_each_key(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.lr=1e-3") == 0
    recipe_before = (out / "recipe.yaml").read_text()
    card_before = (out / "final" / "README.md").read_text()
    assert run_tiny(synthetic_root, out, "train.max_steps=3", "train.lr=5e-4", "data.labeled_percent=50") == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.0005" in err and "data.labeled_percent: 100.0 -> 50.0" in err
    assert "resume=force" in err and "another output_dir" in err
    assert (out / "recipe.yaml").read_text() == recipe_before  # the record is as it was
    assert (out / "final" / "README.md").read_text() == card_before
    assert len(json.loads((out / "run_info.json").read_text())) == 1


def test_a_relaunch_may_extend_the_run_and_force_records_a_change(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.lr=1e-3") == 0
    caplog.set_level("INFO")
    assert run_tiny(synthetic_root, out, "train.max_steps=3", "train.lr=1e-3", "train.log_every=2") == 0
    assert "relaunch: train.log_every: 1 -> 2, train.max_steps: 2 -> 3" in caplog.text
    assert run_tiny(synthetic_root, out, "train.max_steps=4", "train.lr=5e-4", "resume=force") == 0
    launches = json.loads((out / "run_info.json").read_text())
    assert [launch["resumed_at_step"] for launch in launches] == [None, 2, 3]
    assert launches[2]["recipe_changes"]["train.lr"] == [0.001, 0.0005]
    assert launches[2]["recipe"]["train"]["lr"] == 0.0005 and launches[0]["recipe"]["train"]["lr"] == 0.001
    card = (out / "final" / "README.md").read_text()
    assert "Trained in 3 launches" in card and "resumed at step 3 with" in card and "train.lr: 0.001 -> 0.0005" in card


def test_a_second_launch_on_a_folder_in_use_stops_naming_the_holder_and_a_dead_holder_is_taken_over(
    synthetic_root, tmp_path, capsys
):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=1") == 0
    hold = (
        "import sys, time; from gd_hf.run.launches import lock_output_folder; "
        f"assert lock_output_folder({str(out)!r}) is None; print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_tiny(synthetic_root, out, "train.max_steps=2") == 2
        err = capsys.readouterr().err
        assert f"is in use by another launch (pid {holder.pid} on" in err
        assert len(json.loads((out / "run_info.json").read_text())) == 1  # nothing written by the second
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # the dead holder's lock is free


def test_the_free_space_check_counts_a_resumed_runs_own_checkpoints_as_its_own(tmp_path, monkeypatch):
    import shutil as shutil_module

    from gd_hf.run.launches import check_output_folder

    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / "model.safetensors").write_bytes(b"\0" * 100_000)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=50_000))
    assert check_output_folder(out, 120_000) is None  # 100 kB of it is the run's, replaced as it goes
    assert "GB free but the run needs" in check_output_folder(out, 200_000)


def test_an_unexpected_error_exits_1_with_the_traceback_and_a_last_line_naming_it(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    import gd_hf.run.phase as phase_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(phase_module, "build_teacher", broken)
    assert launch(synthetic_root, tmp_path / "run") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("ZeroDivisionError: a bug" in line for line in lines)
    assert lines[-1] == "gd_hf.train: " + main_outcome(1)


def test_checkpoints_are_flushed_to_disk_before_they_are_renamed_into_place(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.files as files

    flushed, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (renamed.append((str(a), len(flushed))), real_replace(a, b))[1]
    )
    assert launch(synthetic_root, tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=1") == 0
    checkpoint_renames = [(a, n) for a, n in renamed if ".tmp_step_" in a]
    assert len(checkpoint_renames) == 2
    for tmp, flushed_before in checkpoint_renames:
        files_flushed = [f for f in flushed[:flushed_before] if f.startswith(tmp + "/")]
        assert {Path(f).name for f in files_flushed} >= {"model.safetensors", "optimizer.bin", "trainer_state.json"}


def test_a_relaunch_naming_the_same_folders_another_way_is_not_a_change(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    monkeypatch.chdir(synthetic_root.parent)
    relative = [o.replace(f"{synthetic_root}/", f"{synthetic_root.name}/") for o in tiny_overrides(synthetic_root, out)]
    assert relative != tiny_overrides(synthetic_root, out)
    assert main([DEMO_RECIPE, *relative, "train.max_steps=3"]) == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["recipe_changes"] == {"train.max_steps": [2, 3]}


# --- one-launch runs (phase 1, then phases 2-3), as every paper recipe --------------------------------------

ONE_LAUNCH = ["ssl.enabled=true", "ssl.train_teacher_first=true", "ssl.teacher_max_steps=2", "ssl.burn_in_steps=1",
              "ssl.unlabeled_batch_size=2", "train.max_steps=2"]  # fmt: skip


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_one_launch_run_locks_its_folder_before_phase_1(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    hold = f"from gd_hf.run.launches import lock_output_folder; import time; lock_output_folder({str(out)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 2
        assert "is in use by another launch" in capsys.readouterr().err
        assert not (out / "teacher").exists()  # phase 1 did not start
    finally:
        holder.kill()
        holder.wait()


def test_a_one_launch_relaunch_on_a_folder_of_another_run_stops_before_phase_1(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # a supervised run
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 2
    assert "ssl.enabled: False -> True" in capsys.readouterr().err
    assert not (out / "teacher").exists()


def test_a_one_launch_relaunch_leaves_the_teacher_and_compares_the_launched_recipe(synthetic_root, tmp_path, capsys):
    import shutil

    first = tmp_path / "first"
    assert run_tiny(synthetic_root, first, *ONE_LAUNCH) == 0
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    teacher_final = sha(moved / "teacher" / "final" / "model.safetensors")
    # Extended (an allowed change), in a moved folder: phase 1 is not run again, the teacher stays as it was.
    assert run_tiny(synthetic_root, moved, *ONE_LAUNCH, "train.max_steps=3") == 0
    assert sha(moved / "teacher" / "final" / "model.safetensors") == teacher_final
    card = (moved / "final" / "README.md").read_text()
    note = next(line for line in card.splitlines() if "Trained in 2 launches" in line)
    assert "output_dir: '.../first' -> '.../moved'" in note and str(tmp_path) not in note  # no machine path
    assert len(json.loads((moved / "teacher" / "run_info.json").read_text())) == 1
    assert json.loads((moved / "run_info.json").read_text())[-1]["recipe_changes"] == {
        "output_dir": [str(first), str(moved)],
        "train.max_steps": [2, 3],
    }
    capsys.readouterr()
    # A key of phases 2-3 is named as a change of the student's run, not of the teacher's.
    assert run_tiny(synthetic_root, moved, *ONE_LAUNCH, "train.max_steps=4", "ssl.unsup_loss_weight=3") == 2
    err = capsys.readouterr().err
    assert f"changes what the run in {moved} trained" in err and "ssl.unsup_loss_weight: 0.5 -> 3.0" in err


def test_a_one_launch_run_resumed_from_a_named_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH, "train.checkpoint_every=1") == 0
    named = out / "checkpoints" / "step_00000001"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH, "train.checkpoint_every=1", f"resume={named}") == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["resumed_at_step"] == 1


# --- more faults of the record ----------------------------------------------------------------------------


def test_the_card_names_only_the_launches_that_trained_its_weights(synthetic_root, tmp_path):
    import shutil

    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert "Trained in 2 launches" in (out / "final" / "README.md").read_text()
    for name in ("checkpoints", "best", "final"):
        shutil.rmtree(out / name, ignore_errors=True)
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # a fresh start
    assert "launches" not in (out / "final" / "README.md").read_text()
    assert len(json.loads((out / "run_info.json").read_text())) == 3  # the record keeps all of them


def test_an_unreadable_run_record_is_kept_aside_not_overwritten(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    (out / "run_info.json").write_text('[{"x"')
    caplog.set_level("WARNING")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert (out / "run_info.json.unreadable").read_text() == '[{"x"'
    assert "cannot be read: kept as" in caplog.text


@pytest.mark.parametrize("junk", ['{"step": null, "loss": 1}', '{"step": "7"}', "[1, 2]", "not json at all"])
def test_junk_lines_in_the_metrics_log_are_dropped_at_relaunch(synthetic_root, tmp_path, junk):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], junk, *lines[1:]]) + "\n")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert junk not in log.read_text()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines() if "loss" in line] == [1, 2, 3]


def test_an_output_folder_whose_lock_cannot_be_written_is_exit_2(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".gd_hf.lock").mkdir(parents=True)  # as root, permissions do not stop a write: a folder does
    assert run_tiny(synthetic_root, out) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_a_val_set_without_objects_stops_at_start(synthetic_root, tmp_path, capsys):
    coco = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    for name, edit in [("no_images", {"images": [], "annotations": []}), ("no_objects", {"annotations": []})]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**coco, **edit}))
        out = tmp_path / name
        assert run_tiny(synthetic_root, out, f"data.val_annotations={path}") == 2
        err = capsys.readouterr().err
        assert ("lists no images" if name == "no_images" else "no object to detect") in err and "Traceback" not in err
        assert not out.exists()


def test_a_teacher_with_non_finite_weights_is_refused_at_start(synthetic_root, tmp_path, capsys):
    from gd_hf.models import build_model
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


def test_finite_weights_of_any_size_are_finite():
    from gd_hf.weights import all_finite

    big = torch.nn.Linear(1000, 1000)
    torch.nn.init.constant_(big.weight, 1e17)  # the sum of squares overflows float32; the weights do not
    assert bool(all_finite(big))
    big.bias.data[3] = float("nan")
    assert not bool(all_finite(big))


def test_an_unlabeled_image_keeps_its_place_when_its_hidden_labels_cannot_be_decoded(synthetic_root):
    from gd_hf.config import DataConfig
    from gd_hf.data.coco import to_hf_dataset
    from gd_hf.data.loading import unlabeled_sample

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    record = next(
        r
        for r in records.cast_column("image", __import__("datasets").Image(decode=False))
        if r["objects"]["rle_counts"]
    )
    record["objects"]["rle_counts"][0] = "1" * 40
    sample = unlabeled_sample(record, DataConfig(crop_size=64, min_scale=1.0, max_scale=1.0), seed=0)
    assert sample["weak"].shape[-2:] == (64, 64) and len(sample["hidden_classes"]) == 0  # monitoring only


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_labeled_records_of_shards_with_bad_masks_are_found_at_start(synthetic_root, on_error, caplog):
    from gd_hf.data.coco import to_hf_dataset
    from gd_hf.data.prepare import drop_records_with_bad_masks

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    rows = [r for r in records.to_list() if r["objects"]["rle_counts"]]
    rows[1]["objects"]["rle_counts"][0] = "0"
    broken = __import__("datasets").Dataset.from_list(rows, features=records.features)
    if on_error == "raise":
        with pytest.raises(DataError, match=f"image id {rows[1]['image_id']}: RLE counts cover 0 pixels"):
            drop_records_with_bad_masks(broken, on_error)
        return
    caplog.set_level("WARNING")
    kept = drop_records_with_bad_masks(broken, on_error)
    assert len(kept) == len(rows) - 1 and rows[1]["image_id"] not in kept["image_id"]
    assert "skipping 1 labeled records" in caplog.text


def test_a_one_launch_run_relaunched_from_its_own_recipe_file_goes_on(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 0
    assert main([str(out / "recipe.yaml"), "train.max_steps=3"]) == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["recipe_changes"] == {"train.max_steps": [2, 3]}


def test_a_one_launch_run_resumed_from_another_folders_checkpoint_does_not_train_a_teacher(synthetic_root, tmp_path):
    first = tmp_path / "first"
    assert run_tiny(synthetic_root, first, *ONE_LAUNCH, "train.checkpoint_every=1") == 0
    second = tmp_path / "second"
    named = first / "checkpoints" / "step_00000001"
    assert run_tiny(synthetic_root, second, *ONE_LAUNCH, f"resume={named}") == 0
    assert not (second / "teacher").exists()  # the checkpoint holds the teacher it started from
    assert json.loads((second / "run_info.json").read_text())[-1]["resumed_at_step"] == 1


def test_checkpoint_needs_the_files_of_the_processes_that_wrote_it(synthetic_root, tmp_path):
    from gd_hf.run.checkpointing import checkpoint_problem

    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=1", "train.checkpoint_every=1") == 0
    checkpoint = out / "checkpoints" / "step_00000001"
    assert checkpoint_problem(checkpoint) is None  # written by 1 process: resumable by any number
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 1
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    assert "random_states_1.pkl" in checkpoint_problem(checkpoint)
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"")
    assert "written by an older gd_hf" in checkpoint_problem(checkpoint)


def test_a_run_record_with_odd_fields_does_not_stop_a_relaunch(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    (out / "run_info.json").write_text(json.dumps([{"resumed_at_step": 1, "recipe_changes": []}]))
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    card = (out / "final" / "README.md").read_text()
    assert "Trained in more than 2 launches" in card  # the record of the first launch is gone: not "from step 0"


def test_crowd_regions_do_not_make_a_labeled_record_bad(synthetic_root):
    import datasets

    from gd_hf.data.coco import to_hf_dataset
    from gd_hf.data.prepare import drop_records_with_bad_masks

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    rows = [r for r in records.to_list() if r["objects"]["rle_counts"]]
    rows[0]["objects"]["rle_counts"][0], rows[0]["objects"]["iscrowd"][0] = "zz", 1  # never decoded for training
    kept = drop_records_with_bad_masks(datasets.Dataset.from_list(rows, features=records.features), "skip")
    assert len(kept) == len(rows)


def _die_like_the_oom_killer(*args, **kwargs) -> None:
    os._exit(137)  # in the child that parses a COCO file: as if killed for memory


def test_a_parse_child_that_dies_is_a_data_error_naming_the_file(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.data.coco_source as coco_source

    monkeypatch.setattr(coco_source, "build_records_cache", _die_like_the_oom_killer)  # pickled by name for the child
    annotations = synthetic_root / "annotations" / "instances_val.json"
    with pytest.raises(DataError, match=r"instances_val\.json: the process parsing it died .*killed for memory"):
        coco_source.coco_records(annotations, synthetic_root / "val", tmp_path / "cache")
