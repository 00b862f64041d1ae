"""Data in the formats users already have, each written here in its published schema: the records' masks equal
the masks drawn into the fixture (pixel-exact), each format trains and evaluates, and each broken variant fails
with its clear error or its counted warning."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError
from gd_hf.data.convert import main as convert_main
from gd_hf.data.masks import decode_masks, object_masks
from gd_hf.data.sources import open_source
from gd_hf.train import train

from .conftest import demo_recipe, tiny_overrides

LABEL2ID = {"background": 0, "cat": 1, "dog": 2}  # the transformers example's convention: 0 is background
SIZES = [(48, 64), (64, 48), (56, 56), (40, 72)]  # (height, width): mixed sizes and aspect ratios


@dataclass
class Scene:
    """One image and its objects: (class id, bool mask) in drawing order."""

    pixels: np.ndarray
    objects: list[tuple[int, np.ndarray]]


def draw_scenes(count: int, seed: int) -> list[Scene]:
    """Images of mixed sizes with 1-3 non-overlapping rectangles and ellipses of classes 1 (cat) and 2 (dog)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(count):
        height, width = SIZES[k % len(SIZES)]
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        objects = []
        for j in range(1 + k % 3):  # object j lives in its own vertical band: no overlap
            x0, x1 = j * width // 3 + 1, (j + 1) * width // 3 - 1
            y0 = int(rng.integers(1, height // 3))
            y1 = int(rng.integers(height // 2, height - 1))
            class_id = int(rng.integers(1, 3))
            yy, xx = np.mgrid[:height, :width]
            if class_id == 1:
                mask = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            else:
                cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            pixels[mask] = (200, 40, 40) if class_id == 1 else (40, 40, 200)
            objects.append((class_id, mask))
        scenes.append(Scene(pixels, objects))
    return scenes


def semantic_instance_png(scene: Scene) -> Image.Image:
    """transformers' layout: channel 0 the class, channel 1 the instance id, channel 2 zeros."""
    array = np.zeros((*scene.pixels.shape[:2], 3), dtype=np.uint8)
    for instance, (class_id, mask) in enumerate(scene.objects, 1):
        array[mask, 0], array[mask, 1] = class_id, instance
    return Image.fromarray(array)


def instance_id_png(scene: Scene, offset: int = 0) -> Image.Image:
    """One channel of instance ids 1..N (16-bit: ids above 255 are common in cell data)."""
    array = np.zeros(scene.pixels.shape[:2], dtype=np.uint16)
    for instance, (_, mask) in enumerate(scene.objects, 1):
        array[mask] = instance + offset
    return Image.fromarray(array)


def assert_records_match(records, scenes_by_id: dict[int, Scene], class_of: dict[int, int]):
    """Every record's decoded masks and classes equal the scene's, pixel for pixel, in drawing order."""
    seen = 0
    for record in records:
        scene = scenes_by_id[record["image_id"]]
        height, width = scene.pixels.shape[:2]
        assert (record["height"], record["width"]) == (height, width)
        masks = object_masks(record["objects"]["rle_counts"], record["objects"]["polygons"], height, width)
        assert len(masks) == len(scene.objects), record["image_id"]
        for decoded, category, (class_id, drawn) in zip(masks, record["objects"]["category"], scene.objects):
            assert np.array_equal(decoded, drawn)
            assert category == class_of[class_id]
        seen += 1
    assert seen == len(scenes_by_id)


def train_briefly(overrides: list[str], tmp_path: Path, synthetic_root: Path) -> dict:
    """Two training steps and an evaluation of the tiny model on the source the overrides name."""
    out = tmp_path / "run"
    base = tiny_overrides(synthetic_root, out) + ["train.max_steps=2", "train.checkpoint_every=0"]
    recipe = demo_recipe(base + overrides)
    opened = open_source(recipe.data)
    metrics = train(recipe)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # The evaluation predicted on every val image, with the source's own category ids.
    predictions = json.loads(sorted((out / "predictions").glob("*.json"))[-1].read_text())
    assert {r["image_id"] for r in predictions} == set(opened.val["image_id"])
    assert {r["category_id"] for r in predictions} <= set(opened.categories.ids)
    return json.loads((out / "final" / "config.json").read_text())["id2label"]


# --- transformers' instance-segmentation example layout --------------------------------------------------------


def transformers_example_dataset(scenes: list[Scene]) -> datasets.Dataset:
    """Exactly as the example's README builds one: image, annotation (PIL), semantic_class_to_id per row."""
    split = {
        "image": [Image.fromarray(s.pixels) for s in scenes],
        "annotation": [semantic_instance_png(s) for s in scenes],
        "semantic_class_to_id": [LABEL2ID] * len(scenes),
    }
    return (
        datasets.Dataset.from_dict(split)
        .cast_column("image", datasets.Image())
        .cast_column("annotation", datasets.Image())
    )


@pytest.fixture(scope="module")
def example_scenes():
    return draw_scenes(12, seed=0), draw_scenes(4, seed=1)


@pytest.mark.parametrize("stored", ["save_to_disk", "parquet"])
def test_the_transformers_example_layout_round_trips_and_trains(example_scenes, stored, tmp_path, synthetic_root):
    train_scenes, val_scenes = example_scenes
    folder = tmp_path / "ade20k-like"
    splits = datasets.DatasetDict(
        train=transformers_example_dataset(train_scenes), validation=transformers_example_dataset(val_scenes)
    )
    if stored == "save_to_disk":
        splits.save_to_disk(str(folder))
    else:  # as push_to_hub lays it out
        for name, split in splits.items():
            split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    config = DataConfig(source="hub", hub_dataset=str(folder), mask_encoding="semantic_instance_channels")
    opened = open_source(config)
    assert opened.categories.names == ["cat", "dog"] and opened.categories.ids == [1, 2]
    # No image-id column: the row index is the id.
    assert_records_match(opened.train, dict(enumerate(train_scenes)), {1: 0, 2: 1})
    assert_records_match(opened.val, dict(enumerate(val_scenes)), {1: 0, 2: 1})
    labels = train_briefly(
        ["data.source=hub", f"data.hub_dataset={folder}", "data.mask_encoding=semantic_instance_channels"],
        tmp_path,
        synthetic_root,
    )
    assert list(labels.values()) == ["cat", "dog"]


def test_the_example_layout_streams(example_scenes, tmp_path):
    train_scenes, val_scenes = example_scenes
    folder = tmp_path / "streamed"
    for name, scenes in (("train", train_scenes), ("validation", val_scenes)):
        dataset = transformers_example_dataset(scenes).add_column("image_id", list(range(100, 100 + len(scenes))))
        dataset.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    config = DataConfig(
        source="hub", hub_dataset=str(folder), mask_encoding="semantic_instance_channels", streaming=True
    )
    opened = open_source(config)
    assert isinstance(opened.train, datasets.IterableDataset)
    assert_records_match(opened.train, {100 + k: s for k, s in enumerate(train_scenes)}, {1: 0, 2: 1})


def test_mask_image_errors_name_the_row_and_what_to_do(example_scenes, tmp_path):
    train_scenes, _ = example_scenes
    folder = tmp_path / "gray"
    gray = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(s.pixels) for s in train_scenes[:2]], "annotation": [instance_id_png(s) for s in train_scenes[:2]]}
    ).cast_column("image", datasets.Image()).cast_column("annotation", datasets.Image())  # fmt: skip
    datasets.DatasetDict(train=gray, validation=gray).save_to_disk(str(folder))
    config = DataConfig(
        source="hub", hub_dataset=str(folder), mask_encoding="semantic_instance_channels", category_names=["a", "b"]
    )
    with pytest.raises(DataError, match=r"row 0, column 'annotation': semantic_instance_channels needs .* channels"):
        open_source(config)
    # instance_ids without a per-image table and more than one class: which instance, and what to give.
    config.mask_encoding = "instance_ids"
    with pytest.raises(DataError, match=r"row 0.*instance 1 has no class"):
        open_source(config)
    # No class names anywhere: said at start, naming the three ways to give them.
    config.category_names = None
    with pytest.raises(DataError, match="data.classes_file"):
        open_source(config)


# --- instance-id PNG folders, ImageFolder + metadata.jsonl -----------------------------------------------------


def write_instance_folder(scenes: list[Scene], images: Path, masks: Path, with_tables: bool = True) -> None:
    for k, scene in enumerate(scenes):
        (images / "sub").mkdir(parents=True, exist_ok=True)
        (masks / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.pixels).save(images / "sub" / f"img{k:02d}.png")
        instance_id_png(scene).save(masks / "sub" / f"img{k:02d}.png")
        if with_tables:
            table = {str(i): class_id for i, (class_id, _) in enumerate(scene.objects, 1)}
            (masks / "sub" / f"img{k:02d}.json").write_text(json.dumps(table))


def test_instance_png_folders_convert_to_coco_and_train(example_scenes, tmp_path, synthetic_root):
    train_scenes, val_scenes = example_scenes
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"1": "cat", "2": "dog"}))
    for split, scenes in (("train", train_scenes), ("val", val_scenes)):
        write_instance_folder(scenes, tmp_path / split / "images", tmp_path / split / "masks")
        code = convert_main(
            ["masks", str(tmp_path / split / "images"), str(tmp_path / split / "masks"),
             str(tmp_path / f"instances_{split}.json"), "--encoding", "instance_ids", "--classes", str(classes)]
        )  # fmt: skip
        assert code == 0
    coco = json.loads((tmp_path / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert coco["images"][0]["file_name"] == "sub/img00.png"
    source = [
        f"data.train_images={tmp_path / 'train' / 'images'}",
        f"data.train_annotations={tmp_path / 'instances_train.json'}",
        f"data.val_images={tmp_path / 'val' / 'images'}",
        f"data.val_annotations={tmp_path / 'instances_val.json'}",
    ]
    config = demo_recipe(tiny_overrides(synthetic_root, tmp_path) + source)
    opened = open_source(config.data)
    assert_records_match(opened.train, {k + 1: s for k, s in enumerate(train_scenes)}, {1: 0, 2: 1})
    assert list(train_briefly(source, tmp_path, synthetic_root).values()) == ["cat", "dog"]


def test_a_single_class_instance_folder_needs_no_tables_and_a_missing_mask_is_named(example_scenes, tmp_path):
    from gd_hf.data.categories import Categories
    from gd_hf.data.convert import masks_to_coco

    scenes = example_scenes[0][:3]
    write_instance_folder(scenes, tmp_path / "images", tmp_path / "masks", with_tables=False)
    coco = masks_to_coco(tmp_path / "images", tmp_path / "masks", "instance_ids", Categories([1], ["nucleus"]))
    assert len(coco["annotations"]) == sum(len(s.objects) for s in scenes)
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    with pytest.raises(DataError, match="instance 1 has no class"):  # two classes, no table
        masks_to_coco(tmp_path / "images", tmp_path / "masks", "instance_ids", Categories([1, 2], ["a", "b"]))
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(tmp_path / "masks" / "sub" / "img02.png")
    with pytest.raises(DataError, match=r"img02.png is 10x10 but .*img02.png is \d+x\d+"):
        masks_to_coco(tmp_path / "images", tmp_path / "masks", "instance_ids", Categories([1], ["nucleus"]))
    (tmp_path / "masks" / "sub" / "img01.png").unlink()
    with pytest.raises(DataError, match=r"img01.png \(the mask of .*img01.png\) does not exist"):
        masks_to_coco(tmp_path / "images", tmp_path / "masks", "instance_ids", Categories([1], ["nucleus"]))


def test_imagefolder_with_a_mask_column_reads_through_the_same_reader(example_scenes, tmp_path, synthetic_root):
    """`datasets` ImageFolder: `metadata.jsonl` with `file_name`, `mask_file_name` (-> a `mask` Image column) and
    each image's `{instance id: class}`."""
    train_scenes, val_scenes = example_scenes
    root = tmp_path / "imagefolder"
    for split, scenes in (("train", train_scenes), ("validation", val_scenes)):
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as metadata:
            for k, scene in enumerate(scenes):
                Image.fromarray(scene.pixels).save(root / split / f"{k}.png")
                instance_id_png(scene).save(root / split / f"{k}_mask.png")
                table = {str(i): c for i, (c, _) in enumerate(scene.objects, 1)}
                metadata.write(json.dumps({"file_name": f"{k}.png", "mask_file_name": f"{k}_mask.png",
                                           "image_id": k, "instance_classes": table}) + "\n")  # fmt: skip
    classes = tmp_path / "id2label.json"
    classes.write_text(json.dumps({"1": "cat", "2": "dog"}))
    source = [
        "data.source=hub",
        f"data.hub_dataset={root}",
        "data.mask_encoding=instance_ids",
        "data.hub_columns.mask=mask",
        f"data.classes_file={classes}",
    ]
    config = demo_recipe(tiny_overrides(synthetic_root, tmp_path) + source)
    opened = open_source(config.data)
    assert_records_match(opened.train, dict(enumerate(train_scenes)), {1: 0, 2: 1})
    assert list(train_briefly(source, tmp_path, synthetic_root).values()) == ["cat", "dog"]


# --- COCO panoptic ---------------------------------------------------------------------------------------------


def write_panoptic(scenes: list[Scene], root: Path) -> Path:
    """A COCO-panoptic pair under `root`: images/*.jpg, panoptic/*.png (segment id = R + 256 G + 256^2 B, ids
    above 65,535 so that all three channels are used) and panoptic.json; a stuff segment (sky) in every image."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations = [], []
    for k, scene in enumerate(scenes):
        height, width = scene.pixels.shape[:2]
        Image.fromarray(scene.pixels).save(root / "images" / f"{k:012d}.jpg", quality=95)
        ids = np.zeros((height, width), dtype=np.int64)
        segments = []
        sky = np.zeros((height, width), bool)
        sky[0, :] = True  # the top row: a stuff segment
        for j, (class_id, mask) in enumerate([*scene.objects, (184, sky & ~np.any([m for _, m in scene.objects], 0))]):
            segment_id = 70_000 + 300 * k + j
            ids[mask] = segment_id
            segments.append({"id": segment_id, "category_id": class_id, "iscrowd": 0, "area": int(mask.sum())})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{k:012d}.png")
        images.append({"id": k, "file_name": f"{k:012d}.jpg", "height": height, "width": width})
        annotations.append({"image_id": k, "file_name": f"{k:012d}.png", "segments_info": segments})
    categories = [
        {"id": 1, "name": "cat", "isthing": 1},
        {"id": 2, "name": "dog", "isthing": 1},
        {"id": 184, "name": "sky", "isthing": 0},
    ]
    panoptic = root / "panoptic.json"
    panoptic.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return panoptic


def test_a_coco_panoptic_pair_converts_things_only(example_scenes, tmp_path, synthetic_root):
    """PNG segment id = R + 256 G + 256^2 B with segments_info; a stuff segment (sky) is not an object."""
    from gd_hf.data.coco import load_coco

    scenes = example_scenes[0][:4]
    panoptic = write_panoptic(scenes, tmp_path)
    out = tmp_path / "instances.json"
    args = ["masks", str(tmp_path / "images"), str(tmp_path / "panoptic"), str(out), "--encoding", "coco_panoptic"]
    assert convert_main([*args, "--panoptic-json", str(panoptic)]) == 0
    source = load_coco(out, tmp_path / "images")
    assert source.category_names == ["cat", "dog"]
    for k, scene in enumerate(scenes):
        image_id = sorted(source.images)[k]
        anns = source.annotations[image_id]
        height, width = scene.pixels.shape[:2]
        masks = decode_masks([a["rle"]["counts"] for a in anns], height, width)
        assert [a["category"] for a in anns] == [c - 1 for c, _ in scene.objects]
        assert all(np.array_equal(m, drawn) for m, (_, drawn) in zip(masks, scene.objects))
    assert convert_main(args) == 2  # no --panoptic-json: a clear error, exit code 2
    # The converted file trains and evaluates as any COCO folder (here as its own val split too).
    source = [f"data.{split}_{key}={path}" for split in ("train", "val") for key, path in
              (("images", tmp_path / "images"), ("annotations", out))]  # fmt: skip
    assert list(train_briefly(source, tmp_path, synthetic_root).values()) == ["cat", "dog"]


@pytest.mark.parametrize("typed_as", ["list of dicts", "Sequence (dict of lists)"])
def test_coco_panoptic_on_the_hub_reads_segments_info_and_drops_stuff(example_scenes, tmp_path, caplog, typed_as):
    """COCO panoptic as a hub data set: the image, the panoptic PNG and each image's `segments_info`; the class
    file lists the thing classes, so the sky segments (class 184) are dropped and counted."""
    scenes = example_scenes[0][:4]
    panoptic = json.loads(write_panoptic(scenes, tmp_path / "pair").read_text())
    rows = {
        "image": [str(tmp_path / "pair" / "images" / i["file_name"]) for i in panoptic["images"]],
        "annotation": [str(tmp_path / "pair" / "panoptic" / a["file_name"]) for a in panoptic["annotations"]],
        "segments_info": [
            [{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in a["segments_info"]]
            for a in panoptic["annotations"]
        ],  # fmt: skip
    }
    segment = {
        "id": datasets.Value("int64"),
        "category_id": datasets.Value("int64"),
        "iscrowd": datasets.Value("int64"),
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "segments_info": datasets.List(segment) if typed_as == "list of dicts" else datasets.Sequence(segment),
        }
    )
    if typed_as != "list of dicts":  # a Sequence of dicts is written (and read back) as a dict of lists
        rows["segments_info"] = [{k: [x[k] for x in info] for k in segment} for info in rows["segments_info"]]
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(tmp_path / "hub"))
    # The class file is the panoptic JSON itself: its thing categories are the classes, sky (isthing 0) is not.
    config = DataConfig(
        source="hub",
        hub_dataset=str(tmp_path / "hub"),
        mask_encoding="coco_panoptic",
        classes_file=str(tmp_path / "pair" / "panoptic.json"),
    )
    with caplog.at_level(logging.WARNING, logger="gd_hf"):
        opened = open_source(config)
    assert opened.categories.ids == [1, 2]
    assert_records_match(opened.train, dict(enumerate(scenes)), {1: 0, 2: 1})
    assert f"skipped {len(scenes)} objects: {{'class 184 not in the class list': {len(scenes)}}}" in caplog.text


# --- labeling-tool COCO exports --------------------------------------------------------------------------------


def write_export(tmp_path: Path, name: str, scenes: list[Scene], style: str) -> tuple[Path, Path]:
    """A COCO JSON as CVAT / Label Studio / Roboflow write it, over images of `scenes`."""
    images_dir = tmp_path / name / "images"
    images_dir.mkdir(parents=True)
    first = 0 if style in ("label_studio", "roboflow") else 1
    categories = [{"id": first, "name": "cat"}, {"id": first + 1, "name": "dog"}]
    if style == "roboflow":  # a root category no annotation uses, then the classes
        categories = [{"id": 0, "name": "animals", "supercategory": "none"}] + [
            {"id": 1, "name": "cat", "supercategory": "animals"},
            {"id": 2, "name": "dog", "supercategory": "animals"},
        ]
    class_to_category = {1: categories[-2]["id"], 2: categories[-1]["id"]}
    images, annotations = [], []
    for k, scene in enumerate(scenes):
        height, width = scene.pixels.shape[:2]
        Image.fromarray(scene.pixels).save(images_dir / f"{k}.png")
        images.append({"id": first + k, "file_name": f"{k}.png", "width": width, "height": height})
        for class_id, mask in scene.objects:
            annotation = {
                "id": first + len(annotations),
                "image_id": first + k,
                "category_id": class_to_category[class_id],
            }
            if style == "cvat":  # a mask instance: iscrowd 1 with uncompressed (list-count) RLE
                flat = mask.astype(np.uint8).flatten(order="F")
                changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                counts = np.diff(np.concatenate([[0], changes])).tolist()
                annotation.update(iscrowd=1, segmentation={"size": [height, width], "counts": counts})
            else:  # a polygon around a rectangle's pixels (exact for our rectangles; Label Studio has no iscrowd)
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                annotation["segmentation"] = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
                if style == "roboflow":
                    annotation["iscrowd"] = 0
            annotation["bbox"] = [
                float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
            ]
            annotations.append(annotation)
    if style == "roboflow":  # a box drawn without a mask
        annotations.append({"id": len(annotations), "image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5],
                            "segmentation": [], "iscrowd": 0, "area": 25})  # fmt: skip
    path = tmp_path / name / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, images_dir


def export_source(train_export, val_export) -> list[str]:
    return [
        f"data.train_images={train_export[1]}",
        f"data.train_annotations={train_export[0]}",
        f"data.val_images={val_export[1]}",
        f"data.val_annotations={val_export[0]}",
    ]


def rectangles_only(count: int, seed: int) -> list[Scene]:
    """Scenes whose objects are all rectangles (class 1), so that a 4-point polygon is their exact mask."""
    scenes = draw_scenes(count, seed)
    return [
        Scene(s.pixels, [(1, m) for c, m in s.objects if c == 1] or [(1, _box(s.pixels.shape[:2]))]) for s in scenes
    ]


def _box(shape):
    mask = np.zeros(shape, bool)
    mask[5:15, 5:20] = True
    return mask


def test_a_cvat_export_warns_that_all_objects_are_crowd_and_trains_with_crowd_masks_as_objects(
    example_scenes, tmp_path, synthetic_root, caplog
):
    train_scenes, val_scenes = example_scenes
    train_export = write_export(tmp_path, "train", train_scenes, "cvat")
    val_export = write_export(tmp_path, "val", val_scenes, "cvat")
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path) + export_source(train_export, val_export)
    )  # fmt: skip
    objects = sum(len(s.objects) for s in train_scenes)
    with caplog.at_level(logging.WARNING, logger="gd_hf"):
        open_source(recipe.data)
    assert f"all {objects} objects are crowd regions" in caplog.text and "crowd_masks_as_objects" in caplog.text
    recipe.data.crowd_masks_as_objects = True
    opened = open_source(recipe.data)
    assert_records_match(opened.train, {k + 1: s for k, s in enumerate(train_scenes)}, {1: 0, 2: 1})
    assert all(not any(r["objects"]["iscrowd"]) for r in opened.train)
    source = export_source(train_export, val_export) + ["data.crowd_masks_as_objects=true"]
    assert list(train_briefly(source, tmp_path, synthetic_root).values()) == ["cat", "dog"]


def test_a_label_studio_export_with_ids_from_zero_and_no_iscrowd_trains_and_evaluates(tmp_path, synthetic_root):
    train_scenes, val_scenes = rectangles_only(8, 2), rectangles_only(4, 3)
    train_export = write_export(tmp_path, "train", train_scenes, "label_studio")
    val_export = write_export(tmp_path, "val", val_scenes, "label_studio")
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path) + export_source(train_export, val_export)
    )  # fmt: skip
    opened = open_source(recipe.data)
    assert opened.categories.ids == [0, 1]  # category id 0 is a class like any other
    assert_records_match(opened.train, dict(enumerate(train_scenes)), {1: 0})  # image id 0 included
    # Predictions written from the drawn masks (not from the ground truth): image 0 and annotation 0 count.
    from gd_hf.evaluation.mask_ap import coco_mask_ap

    perfect = []
    for image_id, scene in enumerate(val_scenes):
        for _, mask in scene.objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            perfect.append({"image_id": image_id, "category_id": 0, "score": 1.0,
                            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})  # fmt: skip
    assert json.loads(val_export[0].read_text())["annotations"][0]["id"] == 0
    assert coco_mask_ap(opened.val_ground_truth, perfect)["AP"] == pytest.approx(100.0)
    assert coco_mask_ap(val_export[0], perfect)["AP"] == pytest.approx(100.0)  # the raw file, read the same way
    assert coco_mask_ap(val_export[0], perfect[1:])["AP"] < 100.0  # leaving annotation 0 out is a miss
    train_briefly(export_source(train_export, val_export), tmp_path, synthetic_root)


def test_a_roboflow_root_category_is_reported_and_dropped_only_when_asked(tmp_path, synthetic_root, caplog):
    train_scenes, val_scenes = rectangles_only(8, 4), rectangles_only(4, 5)
    train_export = write_export(tmp_path, "train", train_scenes, "roboflow")
    val_export = write_export(tmp_path, "val", val_scenes, "roboflow")
    overrides = tiny_overrides(synthetic_root, tmp_path) + export_source(train_export, val_export)
    recipe = demo_recipe(overrides)
    with caplog.at_level(logging.WARNING, logger="gd_hf"):
        opened = open_source(recipe.data)
    # "dog" has no annotation either (rectangles only are cats): both are named, with the switch that drops them.
    assert "2 categories have no training annotation: ['animals (id 0)', 'dog (id 2)']" in caplog.text
    assert "data.drop_empty_categories" in caplog.text
    assert "skipped 1 annotations" in caplog.text  # the box without a mask, counted
    assert opened.categories.names == ["animals", "cat", "dog"]
    recipe.data.drop_empty_categories = True
    opened = open_source(recipe.data)
    assert opened.categories.names == ["cat"] and opened.categories.ids == [1]
    assert_records_match(opened.train, dict(enumerate(train_scenes)), {1: 0})
    assert {a["category_id"] for a in opened.val_ground_truth.dataset["annotations"]} == {1}
    labels = train_briefly(
        export_source(train_export, val_export) + ["data.drop_empty_categories=true"], tmp_path, synthetic_root
    )
    assert list(labels.values()) == ["cat"]


# --- hub objects: strictness -----------------------------------------------------------------------------------


def hub_objects_folder(tmp_path: Path, scenes: list[Scene], objects_of) -> Path:
    """A hub data set with an `objects` list column built by `objects_of(scene)`, saved with save_to_disk."""

    def split(part):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(s.pixels) for s in part], "objects": [objects_of(s) for s in part]}
        ).cast_column("image", datasets.Image())

    folder = tmp_path / "hub_objects"
    datasets.DatasetDict(train=split(scenes), validation=split(scenes[:2])).save_to_disk(str(folder))
    return folder


def test_hub_objects_take_class_names_dense_masks_and_report_skips(example_scenes, tmp_path, caplog):
    scenes = example_scenes[0][:6]
    names = {1: "cat", 2: "dog"}

    def objects(scene):
        dense = [{"category": names[c], "segmentation": m.astype(np.uint8).tolist()} for c, m in scene.objects]
        return dense + [{"category": "cat", "segmentation": []}]  # a box-only object: skipped, counted

    folder = hub_objects_folder(tmp_path, scenes, objects)
    config = DataConfig(source="hub", hub_dataset=str(folder), category_names=["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="gd_hf"):
        opened = open_source(config)
    assert_records_match(opened.train, dict(enumerate(scenes)), {1: 0, 2: 1})  # dense masks read as masks
    assert f"skipped {len(scenes)} objects" in caplog.text and "no segmentation" in caplog.text


@pytest.mark.parametrize(
    ("category", "message"),
    [
        ("zebra", r"class 'zebra' is not one of the class names \['cat', 'dog'\]"),
        (7, r"class id 7 is not in the class list"),
    ],
)
def test_hub_classes_outside_the_class_list_fail_at_start(example_scenes, tmp_path, category, message):
    scenes = example_scenes[0][:2]

    def objects(scene):
        rle = mask_utils.encode(np.asfortranarray(scene.objects[0][1].astype(np.uint8)))
        return [{"category": category, "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}}]

    folder = hub_objects_folder(tmp_path, scenes, objects)
    with pytest.raises(DataError, match=r"row 0, object 0: " + message):
        open_source(DataConfig(source="hub", hub_dataset=str(folder), category_names=["cat", "dog"]))


def test_class_zero_is_background_in_the_example_layout_whatever_the_class_list_says(example_scenes, tmp_path, caplog):
    """semantic_instance_channels: class 0 pixels are background. Recipe names count from 1; a table that names
    id 0 otherwise (a reduce-labels config.json) loses it with a warning instead of a class nothing can learn."""
    train_scenes, val_scenes = example_scenes
    folder = tmp_path / "example"
    splits = datasets.DatasetDict(
        train=transformers_example_dataset(train_scenes).remove_columns("semantic_class_to_id"),
        validation=transformers_example_dataset(val_scenes).remove_columns("semantic_class_to_id"),
    )
    splits.save_to_disk(str(folder))
    names = DataConfig(
        source="hub", hub_dataset=str(folder), mask_encoding="semantic_instance_channels", category_names=["cat", "dog"]
    )
    opened = open_source(names)
    assert opened.categories.ids == [1, 2] and opened.categories.names == ["cat", "dog"]
    assert_records_match(opened.train, dict(enumerate(train_scenes)), {1: 0, 2: 1})
    table = tmp_path / "id2label.json"
    table.write_text(json.dumps({"0": "unlabeled", "1": "cat", "2": "dog"}))
    config = DataConfig(
        source="hub", hub_dataset=str(folder), mask_encoding="semantic_instance_channels", classes_file=str(table)
    )
    with caplog.at_level(logging.WARNING, logger="gd_hf"):
        opened = open_source(config)
    assert opened.categories.names == ["cat", "dog"]
    assert "class id 0 ('unlabeled') is background" in caplog.text


def test_mask_images_of_the_wrong_size_or_with_unknown_classes_fail_at_start(example_scenes, tmp_path):
    scenes = example_scenes[0][:2]
    wrong_size = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(s.pixels) for s in scenes],
            "annotation": [semantic_instance_png(s).resize((8, 8)) for s in scenes],
        },
        features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}),
    )
    datasets.DatasetDict(train=wrong_size, validation=wrong_size).save_to_disk(str(tmp_path / "small"))
    config = DataConfig(
        source="hub",
        hub_dataset=str(tmp_path / "small"),
        mask_encoding="semantic_instance_channels",
        category_names=["cat", "dog"],
    )
    with pytest.raises(DataError, match=r"row 0, column 'annotation': the mask is 8x8 but the image 64x48"):
        open_source(config)
    unknown = transformers_example_dataset(scenes).remove_columns("semantic_class_to_id")
    unknown = unknown.add_column("semantic_class_to_id", [{"background": 0, "cat": 1}] * 2)
    datasets.DatasetDict(train=unknown, validation=unknown).save_to_disk(str(tmp_path / "unknown"))
    config.hub_dataset, config.category_names = str(tmp_path / "unknown"), None
    with pytest.raises(DataError, match=r"class 2 is not in the class list \{1: 'cat'\}"):
        open_source(config)


def test_dense_masks_of_0_255_are_read_as_masks(example_scenes, tmp_path):
    scenes = example_scenes[0][:3]
    names = {1: "cat", 2: "dog"}

    def objects(scene):
        return [{"category": names[c], "segmentation": (m.astype(np.uint8) * 255).tolist()} for c, m in scene.objects]

    folder = hub_objects_folder(tmp_path, scenes, objects)
    opened = open_source(DataConfig(source="hub", hub_dataset=str(folder), category_names=["cat", "dog"]))
    assert_records_match(opened.train, dict(enumerate(scenes)), {1: 0, 2: 1})


@pytest.mark.parametrize("encoding", ["cityscapes", "semantic_instance_channels"])
def test_the_masks_converter_reads_cityscapes_ids_and_the_example_layout(example_scenes, tmp_path, encoding):
    """`convert masks` with the other encodings: Cityscapes ids (class * 1000 + k; a bare class value is a crowd
    group; road is dropped) and transformers' two-channel PNGs with a label2id class file."""
    from gd_hf.data.coco import load_coco

    scenes = example_scenes[0][:3]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    city_class = {1: 26, 2: 24}  # cat -> car, dog -> person
    for k, scene in enumerate(scenes):
        Image.fromarray(scene.pixels).save(tmp_path / "images" / f"{k}.png")
        if encoding == "cityscapes":
            ids = np.full(scene.pixels.shape[:2], 7, dtype=np.uint16)  # road everywhere else
            for j, (class_id, mask) in enumerate(scene.objects):
                ids[mask] = city_class[class_id] * 1000 + j
            ids[-2:, :4] = 26  # a group of cars: a crowd region
            Image.fromarray(ids).save(tmp_path / "masks" / f"{k}.png")
        else:
            semantic_instance_png(scene).save(tmp_path / "masks" / f"{k}.png")
    out = tmp_path / "out.json"
    args = ["masks", str(tmp_path / "images"), str(tmp_path / "masks"), str(out), "--encoding", encoding]
    if encoding == "semantic_instance_channels":
        (tmp_path / "label2id.json").write_text(json.dumps(LABEL2ID))
        args += ["--classes", str(tmp_path / "label2id.json")]
    assert convert_main(args) == 0
    source = load_coco(out, tmp_path / "images")
    for k, scene in enumerate(scenes):
        height, width = scene.pixels.shape[:2]
        anns = source.annotations[k + 1]
        objects = [a for a in anns if not a["iscrowd"]]
        names = [source.category_names[a["category"]] for a in objects]
        if encoding == "cityscapes":  # ids in ascending value: person (24xxx) before car (26xxx)
            expected = sorted(scene.objects, key=lambda o: city_class[o[0]])
            assert [a["iscrowd"] for a in anns].count(1) == 1
            assert names == [{26: "car", 24: "person"}[city_class[c]] for c, _ in expected]
        else:
            expected = scene.objects
            assert names == [("cat", "dog")[c - 1] for c, _ in expected]
        masks = decode_masks([a["rle"]["counts"] for a in objects], height, width)
        assert all(np.array_equal(m, drawn) for m, (_, drawn) in zip(masks, expected))
