"""Bad data, each surface a table or a row: images as users have them (odd modes, 16 bits, EXIF rotation,
truncated, huge, decompression bombs), bad COCO training records (`COCO_CASES`: exit code 2 naming the record,
nothing written), unusable segmentations (`SKIPPED_CASES`: skipped at start and counted), bad val sets, shards
with bad masks, records that fail mid-run (skipped and counted; 50 in a row stop the run), and the data commands
(`evaluate`, `splits`, `predict`) on bad files."""

from __future__ import annotations

import copy
import io
import json
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.config import DataConfig
from gd_hf.data.coco import FEATURES, DataError, load_coco, to_hf_dataset
from gd_hf.data.images import read_image
from gd_hf.data.loading import MAX_CONSECUTIVE_BAD_RECORDS, LabeledTrainDataset, labeled_sample
from gd_hf.models import build_model
from gd_hf.train import main

from .conftest import (
    DEMO_RECIPE,
    ROOT,
    demo_recipe,
    launch,
    main_outcome,
    run_tiny,
    tiny_overrides,
)


def record(image: Image.Image | bytes, width: int, height: int, fmt: str = "PNG", **save) -> dict:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **save)
        image = buffer.getvalue()
    return {"image": {"bytes": image, "path": f"test.{fmt.lower()}"}, "image_id": 7, "width": width, "height": height}


def test_grayscale_palette_rgba_and_cmyk_images_become_rgb():
    rgb = (200, 40, 90)
    cases = [
        Image.new("L", (6, 4), 120),
        Image.new("RGB", (6, 4), rgb).convert("P"),
        Image.new("RGBA", (6, 4), (*rgb, 30)),  # alpha is dropped, the colour kept
    ]
    for image in cases:
        pixels = read_image(record(image, 6, 4))
        assert pixels.shape == (3, 4, 6) and pixels.dtype == torch.uint8
    assert read_image(record(cases[0], 6, 4))[:, 0, 0].tolist() == [120, 120, 120]
    assert read_image(record(cases[2], 6, 4))[:, 0, 0].tolist() == list(rgb)
    cmyk = read_image(record(Image.new("CMYK", (6, 4), (0, 255, 0, 0)), 6, 4, fmt="JPEG"))
    assert cmyk.shape == (3, 4, 6) and cmyk[1].float().mean() < 60 and cmyk[0].float().mean() > 200  # magenta


def test_16_bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    pixels = read_image(record(Image.fromarray(values), 64, 4))
    assert pixels.shape == (3, 4, 64)
    expected = np.round(values.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.abs(pixels[0].numpy().astype(int) - expected).max() <= 1  # a ramp, not a white image


def test_predict_reads_a_16_bit_tiff_as_training_does(tmp_path):
    """`gd_hf.predict` must give the model the pixels it was trained and evaluated on: PIL's own
    convert("RGB") clips 16-bit values to white."""
    from gd_hf.predict import load_image

    values = np.linspace(0, 65535, 32 * 8).reshape(8, 32).astype(np.uint16)
    path = tmp_path / "scan.tif"
    Image.fromarray(values).save(path)
    trained_on = read_image({"image": {"path": str(path), "bytes": None}, "image_id": 1, "width": 32, "height": 8})
    predicted_on = torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)
    assert torch.equal(predicted_on, trained_on)
    assert predicted_on.float().std() > 50  # a ramp


def exif_rotated(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_exif_rotated_photo_follows_the_size_the_record_states():
    stored = Image.new("RGB", (8, 4), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 4, 4))  # white left half as stored
    data = exif_rotated(stored, 6)  # "rotate 90 CW to display": viewers show it 4 wide, 8 high
    shown = read_image(record(data, 4, 8))  # the annotation tool drew on the displayed image
    assert shown.shape == (3, 8, 4)
    assert shown[:, :4].float().mean() > 200 and shown[:, 4:].float().mean() < 50  # white on top once turned
    as_stored = read_image(record(data, 8, 4))  # the record states the stored size: left as stored
    assert as_stored.shape == (3, 4, 8) and as_stored[:, :, :4].float().mean() > 200
    with pytest.raises(DataError, match="is 8x4 but the annotation file says 5x5"):
        read_image(record(data, 5, 5))
    assert read_image(record(data, 0, 0)).shape == (3, 8, 4)  # no stated size (image folder): as displayed


def test_truncated_jpeg_is_a_data_error_naming_the_file():
    full = record(Image.new("RGB", (64, 64), (10, 20, 30)), 64, 64, fmt="JPEG")
    truncated = {**full, "image": {"bytes": full["image"]["bytes"][:200], "path": "photos/cut.jpg"}}
    with pytest.raises(DataError, match=r"cannot read image photos/cut\.jpg \(image id 7\)"):
        read_image(truncated)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_10k_by_10k_image_is_read_and_trained_on():
    big = Image.new("L", (10_000, 10_000), 0)
    big.paste(255, (2_000, 2_000, 6_000, 6_000))
    example = record(big, 10_000, 10_000)
    rle_counts = _square_rle(10_000, 2_000, 6_000)
    example["objects"] = {"category": [1], "rle_counts": [rle_counts], "iscrowd": [0], "polygons": [[]]}
    sample = labeled_sample(example, DataConfig(crop_size=64, min_scale=1.0, max_scale=1.0, hflip_prob=0.0), seed=0)
    assert sample["image"].shape == (3, 64, 64) and sample["masks"].shape == (1, 64, 64)
    # The object is 40 % of each side: it stays a square of ~26 px at the training size.
    assert abs(int(sample["masks"][0].sum()) - 26 * 26) < 120
    assert bool((sample["image"][0][sample["masks"][0]] > 200).float().mean() > 0.9)


def _square_rle(size: int, start: int, stop: int) -> str:
    from pycocotools import mask as mask_utils

    mask = np.zeros((size, size), dtype=np.uint8)
    mask[start:stop, start:stop] = 1
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


def test_image_over_the_decompression_bomb_limit_is_a_data_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this is PIL's hard limit
    with pytest.raises(DataError, match="cannot read image"):
        read_image(record(Image.new("RGB", (100, 100)), 100, 100))


@pytest.fixture(scope="module")
def coco(synthetic_root) -> dict:
    return json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())


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
    ("polygon with NaN", lambda c: first_ann(c).update(segmentation=[[0, 0, float("nan"), 5, 9, 9]]), "finite numbers"),
    ("polygon with inf", lambda c: first_ann(c).update(segmentation=[[0, 0, float("inf"), 5, 9, 9]]), "finite numbers"),
    ("polygon at 1e7", lambda c: first_ann(c).update(segmentation=[[0, 0, 1e7, 0, 1e7, 1e7]]), "far outside"),
    ("polygon at 1e12", lambda c: first_ann(c).update(segmentation=[[0, 0, 1e12, 5, 3, 1e12]]), "far outside"),
    ("segmentation a string", lambda c: first_ann(c).update(segmentation="mask"), "neither a polygon"),
]


@pytest.mark.parametrize("rasterise_polygons", [True, False], ids=["val", "train"])  # (train: polygons as parsed)
@pytest.mark.parametrize("name, mutate, reason", SKIPPED_CASES, ids=[c[0] for c in SKIPPED_CASES])
def test_unusable_segmentation_is_skipped_at_start_and_counted(
    synthetic_root, coco, tmp_path, name, mutate, reason, rasterise_polygons
):
    bad = copy.deepcopy(coco)
    mutate(bad)
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps(bad))
    source = load_coco(annotations, synthetic_root / "train", rasterise_polygons=rasterise_polygons)
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


def test_evaluate_on_a_file_without_images_is_an_error(synthetic_root, tmp_path, capsys):
    from gd_hf.evaluate import main as evaluate_main
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

    model = build_model(ModelConfig(backbone_hidden_size=16, backbone_depths=[1, 1, 1, 1],
                                    backbone_num_heads=[1, 1, 2, 2], hidden_dim=32, encoder_layers=1,
                                    decoder_layers=2, num_queries=4), {0: "a"})  # fmt: skip
    results, failures = predict(model, [tmp_path / "huge.png", tmp_path / "small.png"], tmp_path / "out", 64, 64,
                                0.0, 2, 4, "cpu")  # fmt: skip
    assert [f.name for f, _ in failures] == ["huge.png"]
    assert (tmp_path / "out" / "small.png").is_file() and {r["file_name"] for r in results} == {
        str(tmp_path / "small.png")
    }


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


DIES_LIKE_THE_OOM_KILLER = [sys.executable, "-c", "import os; os._exit(137)"]  # a child as if killed for memory


def test_a_parse_child_that_dies_is_a_data_error_naming_the_file(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.data.coco_source as coco_source

    monkeypatch.setattr(coco_source, "build_command", lambda file, folder: DIES_LIKE_THE_OOM_KILLER)
    annotations = synthetic_root / "annotations" / "instances_val.json"
    with pytest.raises(DataError, match=r"instances_val\.json: the process parsing it died .*killed for memory"):
        coco_source.coco_records(annotations, synthetic_root / "val", tmp_path / "cache")


def test_a_dying_val_parse_names_val_and_the_train_build_side_by_side_finishes(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.data.coco_source as coco_source

    real = coco_source.build_command
    monkeypatch.setattr(coco_source, "build_command", lambda file, folder: DIES_LIKE_THE_OOM_KILLER
                        if "val" in file.annotation_file.name else real(file, folder))  # fmt: skip
    files = [coco_source.CocoFile(synthetic_root / "annotations" / f"instances_{split}.json", synthetic_root / split)
             for split in ("train", "val")]  # fmt: skip
    with pytest.raises(DataError, match=r"instances_val\.json: the process parsing it died"):
        coco_source.build_missing_caches(files, tmp_path / "cache")
    built = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(built) == 1 and built[0].startswith("instances_train-")


def test_polygon_objects_of_shards_are_checked_at_start_and_when_read(synthetic_root):
    """Records in gd_hf's schema may hold polygons (a records cache does): a valid one is kept, a NaN or
    far-away coordinate (which crashes pycocotools) is a bad record, at start and when read."""
    from gd_hf.data.masks import object_masks
    from gd_hf.data.prepare import drop_records_with_bad_masks

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    rows = [r for r in records.to_list() if r["objects"]["rle_counts"]][:3]
    for row, polygon in zip(rows, ([2, 2, 30, 2, 30, 30], [2, 2, float("nan"), 2, 30, 30], [0, 0, 3e8, 0, 0, 1])):
        row["objects"] = {"category": [0], "rle_counts": [""], "iscrowd": [0], "polygons": [[polygon]]}
    broken = datasets.Dataset.from_list(rows, features=records.features)
    kept = drop_records_with_bad_masks(broken, "skip")
    assert [r["image_id"] for r in kept] == [rows[0]["image_id"]]
    assert object_masks([""], [[[2, 2, 30, 2, 30, 30]]], 64, 64).sum() > 0
    for polygon in ([2, 2, float("nan"), 2, 30, 30], [0, 0, 3e8, 0, 0, 1]):
        with pytest.raises(ValueError, match="object 0: polygon coordinates"):
            object_masks([""], [[polygon]], 64, 64)


def test_bad_records_are_skipped_until_50_in_a_row_stop_the_run(tmp_path):
    """`data.on_error: skip` steps over unreadable images to the next record, counting them; 50 in a row means
    the data set is broken, not a few files: the run stops naming the last one."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
    bad.write_bytes(b"not an image")
    empty = {"category": [], "rle_counts": [], "iscrowd": [], "polygons": []}

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


STATED_SIZES = [("larger", (40, 32)), ("smaller", (30, 20)), ("swapped", (24, 32))]  # the file is 32 wide, 24 high


@pytest.mark.parametrize("name, stated", STATED_SIZES, ids=[c[0] for c in STATED_SIZES])
def test_a_stated_size_that_disagrees_with_the_file_is_a_bad_record(tmp_path, name, stated):
    """A COCO record whose width/height are not the file's (larger, smaller, or swapped without an EXIF turn):
    its masks were drawn for another image, so it is skipped and counted under `data.on_error: skip` (the next
    record is trained on) and stops the run naming the file and both sizes under `raise`."""
    wrong, right = tmp_path / "wrong.png", tmp_path / "right.png"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(wrong)
    Image.new("RGB", (32, 24), (30, 200, 30)).save(right)
    empty = {"category": [], "rle_counts": [], "iscrowd": [], "polygons": []}
    records = datasets.Dataset.from_dict(
        {"image": [str(wrong), str(right)], "image_id": [1, 2], "width": [stated[0], 32],
         "height": [stated[1], 24], "objects": [empty, empty]},
        features=FEATURES,
    )  # fmt: skip
    data = DataConfig(crop_size=32, min_scale=1.0, max_scale=1.0, on_error="skip")
    sample = LabeledTrainDataset(records, data)[(0, 0)]
    assert sample["image_id"] == 2 and sample["skipped"] == 1
    strict = LabeledTrainDataset(records, DataConfig(crop_size=32, on_error="raise"))
    with pytest.raises(DataError, match=rf"wrong\.png \(image id 1\) is 32x24 but the annotation file says "
                                        rf"{stated[0]}x{stated[1]}"):  # fmt: skip
        strict[(0, 0)]


# --- the table: image files damaged where PIL raises something other than OSError -> a bad record ---------------


def png_with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with one more chunk (a valid CRC) right after its header."""
    import struct
    import zlib

    header_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return png[:header_end] + chunk + png[header_end:]


def _ztxt_bomb() -> bytes:
    import zlib

    return b"k\x00\x00" + zlib.compress(b"a" * (64 * 1024 * 1024))  # over PIL's MAX_TEXT_CHUNK


DAMAGED_CHUNKS = [("truncated pHYs", b"pHYs", lambda: b"\x00\x00"), ("empty sRGB", b"sRGB", lambda: b""),
                  ("zTXt bomb", b"zTXt", _ztxt_bomb)]  # fmt: skip


@pytest.mark.parametrize("name, kind, data", DAMAGED_CHUNKS, ids=[c[0] for c in DAMAGED_CHUNKS])
def test_a_png_with_a_damaged_chunk_is_a_bad_record_naming_the_file(name, kind, data):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    with pytest.raises(DataError, match=r"cannot read image test\.png \(image id 7\): ValueError: "):
        read_image(record(png_with_chunk(buffer.getvalue(), kind, data()), 8, 8))


def test_a_float_image_with_non_finite_pixels_is_a_bad_record():
    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[2, 3] = np.nan
    with pytest.raises(DataError, match="non-finite pixels"):
        read_image(record(Image.fromarray(pixels, mode="F"), 8, 8, fmt="TIFF"))


def test_damaged_training_pngs_are_skipped_and_counted_not_a_crash_at_their_step(synthetic_root, tmp_path):
    """Under `data.on_error: skip` (the default) they are bad records like any other: the run ends and counts
    them (it crashed at their step, and again at every relaunch)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for number, (_, kind, data) in enumerate(DAMAGED_CHUNKS, 1):
        path = root / "train" / f"{number:06d}.png"
        path.write_bytes(png_with_chunk(path.read_bytes(), kind, data()))
    # 24 images, batch 2: 13 steps read every image once at least.
    assert launch(root, tmp_path / "run", "train.max_steps=13", "train.log_every=13") == 0
    last = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "loss" in line
    ]
    assert last[-1]["step"] == 13 and last[-1]["data_skipped"] >= len(DAMAGED_CHUNKS)


# --- the table: the commands' arguments -> exit code 2 and the flag named, before anything is read ---------------

COMMAND_CASES = [
    ("predict threshold NaN", "gd_hf.predict", ["m", "x.png", "--out", "o", "--threshold", "nan"], "--threshold must be a number <= 1"),
    ("predict threshold 5", "gd_hf.predict", ["m", "x.png", "--out", "o", "--threshold", "5"], "--threshold must be a number <= 1"),
    ("evaluate size negative", "gd_hf.evaluate", ["m", "a.json", "i", "--shortest-edge", "-5"], "--shortest-edge and --longest-edge must be in"),
    ("evaluate sizes inverted", "gd_hf.evaluate", ["m", "a.json", "i", "--shortest-edge", "800", "--longest-edge", "600"], "the longest not below the shortest"),
    ("synthetic no images", "gd_hf.data.synthetic", ["{tmp}/s", "--train", "0"], "--train and --val must be >= 1"),
    ("synthetic negative", "gd_hf.data.synthetic", ["{tmp}/s", "--val", "-5"], "--train and --val must be >= 1"),
    ("synthetic over a folder", "gd_hf.data.synthetic", ["{tmp}"], "already exists: remove it or choose another folder"),
    ("synthetic tiny", "gd_hf.data.synthetic", ["{tmp}/s", "--size", "2"], "--size must be in [16, 4096]"),
]  # fmt: skip


@pytest.mark.parametrize("name, module, argv, message", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_a_bad_command_argument_is_exit_2_naming_it(tmp_path, capsys, name, module, argv, message):
    import importlib

    main_of = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main_of([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_among_the_images_is_a_bad_file_not_a_hang(synthetic_root, tmp_path):
    """A named pipe where an image should be blocked the start-up check (and `predict`) for ever: it is named and
    refused (a val image: exit 2 at start), and `predict` passes over it."""
    import shutil
    import subprocess
    import sys

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    fifo = root / "val" / "1000003.png"
    fifo.unlink()
    os.mkfifo(fifo)
    code = ("import sys; from gd_hf.train import main; from tests.conftest import DEMO_RECIPE, tiny_overrides; "
            f"from pathlib import Path; sys.exit(main([DEMO_RECIPE, *tiny_overrides(Path({str(root)!r}), "
            f"Path({str(tmp_path / 'run')!r}))]))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "1000003.png is not a regular file" in result.stderr

    from gd_hf.predict import find_images

    assert fifo not in find_images([str(root / "val")]) and len(find_images([str(root / "val")])) == 7


def test_an_output_path_of_the_wrong_kind_is_named_before_any_work(tmp_path, capsys, synthetic_root):
    """`--out` a folder where a file is written, a file where a folder is, or under a file: exit 2 naming it,
    before the model is loaded (the work would be lost at the end)."""
    from gd_hf.data.splits import main as splits_main
    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.hub.space import main as space_main
    from gd_hf.predict import main as predict_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    annotations = str(synthetic_root / "annotations" / "instances_train.json")
    for command, argv, message in [
        (evaluate_main, ["m", annotations, "i", "--out", str(tmp_path)], "is a folder: give a file name"),
        (evaluate_main, ["m", annotations, "i", "--out", str(a_file / "r.json")], "a_file is a file"),
        (predict_main, ["m", "x.png", "--out", str(a_file)], "a_file is a file, not a folder"),
        (splits_main, [annotations, "--out", str(a_file / "splits")], "a_file is a file"),
        (space_main, ["m", str(a_file / "space")], "a_file is a file"),
    ]:
        try:
            code = command(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2 and message in capsys.readouterr().err, (argv, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_truncated_export_weights_are_one_line_for_evaluate_and_predict(synthetic_root, tmp_path, capsys):
    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.hub.export import export_model
    from gd_hf.models import export_image_processor
    from gd_hf.predict import main as predict_main

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "run"))
    model = build_model(recipe.model, {0: "circle", 1: "rectangle", 2: "triangle", 3: "cross"})
    export = export_model(model, export_image_processor(model, recipe.data), tmp_path / "export")
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    val = synthetic_root / "val"
    annotations = str(synthetic_root / "annotations" / "instances_val.json")
    assert predict_main([str(export), str(val / "1000000.png"), "--out", str(tmp_path / "p")]) == 2
    assert evaluate_main([str(export), annotations, str(val)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: cannot load the model {export}: SafetensorError") == 2 and "Traceback" not in err


def test_an_export_whose_weights_are_another_familys_is_refused_not_predicted_with(synthetic_root, tmp_path, capsys):
    """config.json of an EoMT, weights of a Mask2Former: transformers starts the missing weights at random (a
    warning) and the model predicts noise, exit 0; evaluate and predict refuse it in one line."""
    import shutil

    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.hub.export import export_model
    from gd_hf.models import export_image_processor
    from gd_hf.predict import main as predict_main

    from .conftest import EOMT_TINY

    classes = {0: "circle", 1: "rectangle", 2: "triangle", 3: "cross"}
    exports = {}
    for name, family in (("mask2former", []), ("eomt", EOMT_TINY)):
        recipe = demo_recipe([*tiny_overrides(synthetic_root, tmp_path / "run"), *family])
        model = build_model(recipe.model, classes)
        exports[name] = export_model(model, export_image_processor(model, recipe.data), tmp_path / name)
    shutil.copyfile(exports["mask2former"] / "model.safetensors", exports["eomt"] / "model.safetensors")
    val = synthetic_root / "val"
    assert predict_main([str(exports["eomt"]), str(val / "1000000.png"), "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p" / "predictions.json").exists()
    assert (
        evaluate_main([str(exports["eomt"]), str(synthetic_root / "annotations" / "instances_val.json"), str(val)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("its weights are not the eomt its config.json describes") == 2 and "Traceback" not in err
