"""Conversions into what gd_hf reads: mask images / Cityscapes -> COCO format, COCO folder -> Parquet shards.

    python -m gd_hf.data.convert masks IMAGES MASKS OUT.json --encoding ENCODING [--classes FILE]
                                       [--panoptic-json FILE]
    python -m gd_hf.data.convert cityscapes CITYSCAPES_ROOT [--splits train val]
    python -m gd_hf.data.convert shards ANNOTATIONS IMAGES OUT [--num-shards 16]

**Masks.** Every image under IMAGES (recursively) with its mask image in MASKS: the same relative path with a
`.png` suffix (`a/b.jpg` -> `MASKS/a/b.png`), or for `coco_panoptic` the `file_name` the panoptic JSON gives.
`--encoding` is one of `gd_hf.data.mask_images.MASK_ENCODINGS` (see that module). The classes come from
`--classes` (a JSON id2label `{"1": "cat"}`, label2id `{"cat": 1}`, a list of names, or a transformers
config.json), the panoptic JSON's thing categories, or Cityscapes' 8 instance classes. `instance_ids` takes each
image's `{instance id: class id}` from a JSON beside its mask (`b.png` -> `b.json`), or, with a one-class
`--classes`, that class for every instance. Writes a COCO instances JSON (compressed RLE, `file_name`s relative
to IMAGES, image ids 1.. in sorted path order) that every recipe reads as `data.*_annotations`.

**Cityscapes** (the `masks` converter's `cityscapes` encoding with Cityscapes' file layout). `CITYSCAPES_ROOT` holds `leftImg8bit/{split}/{city}/*_leftImg8bit.png` and
`gtFine/{split}/{city}/*_gtFine_instanceIds.png` (the official archives, unpacked). A pixel of an
instanceIds PNG is `class_id * 1000 + k` for instance k of a class that has instances, or just `class_id`
where the annotators drew a group ("cars" too crowded to separate) or a class without instances. The 8
instance classes (person 24, rider 25, car 26, truck 27, bus 28, train 31, motorcycle 32, bicycle 33) become
COCO categories with their Cityscapes label ids; groups of those classes become `iscrowd: 1` regions (never
training targets, ignored by the COCO evaluation, as crowd regions are); other classes are dropped. Writes
`CITYSCAPES_ROOT/annotations/instances_{split}.json` with `file_name`s relative to `leftImg8bit/{split}`
(the layout the cityscapes_* recipes expect). Image ids: 1.. in sorted file-name order.

**Shards.** A COCO folder (any recipe's `data.train_*` / `data.val_*`) becomes `num_shards` Parquet files
`OUT/data-0000K-of-0000N.parquet` in gd_hf's record schema (`gd_hf.data.coco.FEATURES`, images embedded as
bytes, segmentations as compressed RLE) plus `OUT/gd_hf_dataset.json` with the categories. That folder is a
`data.source: shards` source, streams with several shards (one per process/worker), and uploads as is with
`huggingface_hub.upload_folder` to become a hub data set.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from gd_hf.data.categories import Categories
from gd_hf.data.coco import FEATURES, DataError, load_coco
from gd_hf.data.mask_images import (
    CITYSCAPES_INSTANCE_CLASSES,
    DROPS_OTHER_CLASSES,
    MASK_ENCODINGS,
    encode_objects,
    objects_from_mask,
    read_mask_array,
)
from gd_hf.files import replace_durably, write_text_atomic

logger = logging.getLogger(__name__)

SHARDS_INFO_FILE = "gd_hf_dataset.json"


def _coco_annotations(converted, classes: Categories, image_id: int, first: int) -> list[dict[str, Any]]:
    """One image's `ConvertedObjects` as COCO annotations (ids first+1, first+2, ...)."""
    annotations = []
    for category, counts, crowd in zip(converted.categories, converted.rle_counts, converted.iscrowd):
        rle = {"size": list(converted.size), "counts": counts.encode()}
        annotations.append(
            {
                "id": first + len(annotations) + 1,
                "image_id": image_id,
                "category_id": classes.ids[category],
                "segmentation": {"size": list(converted.size), "counts": counts},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": crowd,
            }
        )
    return annotations


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _mask_of(image_file: Path, mask_file: Path) -> tuple[np.ndarray, int, int]:
    """The mask image's values, and its image's width and height, which the mask must match."""
    with Image.open(image_file) as image:
        width, height = image.size
    array = read_mask_array(mask_file)
    if array.shape[:2] != (height, width):
        raise DataError(f"{mask_file} is {array.shape[1]}x{array.shape[0]} but {image_file} is {width}x{height}")
    return array, width, height


def masks_to_coco(
    images: str | Path,
    masks: str | Path,
    encoding: str,
    classes: Categories | None = None,
    panoptic_json: str | Path | None = None,
) -> dict[str, Any]:
    """The COCO instances dict of a folder of images and their mask images (see the module doc)."""
    images, masks = Path(images), Path(masks)
    if encoding not in MASK_ENCODINGS:
        raise DataError(f"unknown --encoding {encoding!r}: one of {MASK_ENCODINGS}")
    for folder, what in ((images, "image"), (masks, "mask")):
        if not folder.is_dir():
            raise DataError(f"{what} folder {folder} does not exist")
    segments: dict[str, tuple[str, list]] = {}  # image path relative to IMAGES -> (mask file, segments_info)
    if encoding == "coco_panoptic":
        if panoptic_json is None:
            raise DataError("--encoding coco_panoptic needs --panoptic-json (the panoptic annotations JSON)")
        panoptic = json.loads(Path(panoptic_json).read_text())
        by_id = {i["id"]: i["file_name"] for i in panoptic["images"]}
        for a in panoptic["annotations"]:
            segments[by_id[a["image_id"]]] = (a["file_name"], a["segments_info"])
        if classes is None:
            things = [c for c in panoptic["categories"] if c.get("isthing", 1)]
            classes = Categories([c["id"] for c in things], [c["name"] for c in things])
    elif encoding == "cityscapes" and classes is None:
        classes = Categories(list(CITYSCAPES_INSTANCE_CLASSES), list(CITYSCAPES_INSTANCE_CLASSES.values()))
    if classes is None:
        raise DataError(f"--encoding {encoding} needs --classes (a JSON id2label, label2id or list of names)")
    mask_root = masks.resolve()
    image_files = sorted(
        p
        for p in images.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and mask_root not in p.resolve().parents  # masks inside IMAGES
    )
    if not image_files:
        raise DataError(f"no images under {images}")
    coco_images, annotations, dropped = [], [], {}
    for image_id, image_file in enumerate(tqdm(image_files, desc=f"masks ({encoding})", unit="img"), 1):
        relative = image_file.relative_to(images).as_posix()
        if encoding == "coco_panoptic":
            if relative not in segments:
                raise DataError(f"{image_file}: the panoptic JSON has no annotation for {relative}")
            mask_file, segments_info = masks / segments[relative][0], segments[relative][1]
        else:
            mask_file, segments_info = (masks / relative).with_suffix(".png"), None
        if not mask_file.is_file():
            raise DataError(f"{mask_file} (the mask of {image_file}) does not exist")
        array, width, height = _mask_of(image_file, mask_file)
        instance_classes, single = None, None
        if encoding == "instance_ids":
            table_file = mask_file.with_suffix(".json")
            if table_file.is_file():
                instance_classes = json.loads(table_file.read_text())
            elif len(classes.ids) == 1:
                single = classes.ids[0]
        objects = objects_from_mask(
            array, encoding, instance_classes=instance_classes, segments_info=segments_info, single_class=single,
            where=str(mask_file),
        )  # fmt: skip
        converted = encode_objects(objects, classes, str(mask_file), encoding in DROPS_OTHER_CLASSES)
        for reason, n in converted.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        coco_images.append({"id": image_id, "file_name": relative, "width": width, "height": height})
        annotations += _coco_annotations(converted, classes, image_id, len(annotations))
    if dropped:
        logger.info("%s: dropped objects of other classes: %s", masks, dropped)
    categories = [{"id": i, "name": n} for i, n in zip(classes.ids, classes.names)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def write_json(coco: dict[str, Any], path: str | Path) -> Path:
    """Write a COCO dict atomically (never a half-written annotation file)."""
    return write_text_atomic(path, json.dumps(coco))


def cityscapes_to_coco(root: str | Path, split: str) -> dict[str, Any]:
    """The COCO instances dict of one Cityscapes split (see the module doc for the rules)."""
    root = Path(root)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_root.is_dir():
        raise DataError(f"{image_root} does not exist: unpack leftImg8bit_trainvaltest.zip into {root}")
    if not label_root.is_dir():
        raise DataError(f"{label_root} does not exist: unpack gtFine_trainvaltest.zip into {root}")
    classes = Categories(list(CITYSCAPES_INSTANCE_CLASSES), list(CITYSCAPES_INSTANCE_CLASSES.values()))
    image_files = sorted(image_root.glob("*/*_leftImg8bit.png"))
    if not image_files:
        raise DataError(f"no */*_leftImg8bit.png under {image_root}")
    images, annotations = [], []
    for image_id, image_file in enumerate(tqdm(image_files, desc=f"cityscapes {split}", unit="img"), 1):
        stem = image_file.name[: -len("_leftImg8bit.png")]
        label_file = label_root / image_file.parent.name / f"{stem}_gtFine_instanceIds.png"
        if not label_file.is_file():
            raise DataError(f"{label_file} (labels of {image_file}) does not exist: is gtFine complete?")
        ids, width, height = _mask_of(image_file, label_file)
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_file.parent.name}/{image_file.name}",
                "width": width,
                "height": height,
            }
        )
        objects = objects_from_mask(ids, "cityscapes", where=str(label_file))
        annotations += _coco_annotations(
            encode_objects(objects, classes, str(label_file), True), classes, image_id, len(annotations)
        )
    categories = [{"id": i, "name": n} for i, n in zip(classes.ids, classes.names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def convert_cityscapes(root: str | Path, splits: list[str]) -> list[Path]:
    """Write `root/annotations/instances_{split}.json` for each split; returns the files."""
    out_dir = Path(root) / "annotations"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        coco = cityscapes_to_coco(root, split)
        path = write_json(coco, out_dir / f"instances_{split}.json")
        logger.info("%s: %d images, %d annotations", path, len(coco["images"]), len(coco["annotations"]))
        written.append(path)
    return written


def coco_to_shards(annotations: str | Path, images: str | Path, out: str | Path, num_shards: int = 16) -> Path:
    """Write a COCO folder as Parquet shards in gd_hf's record schema (see the module doc)."""
    source = load_coco(annotations, images)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: choose a new folder for the shards")
    ids = sorted(source.images)
    num_shards = max(1, min(num_shards, len(ids)))

    def records(shard_ids: list[int]):
        for image_id in shard_ids:
            info = source.images[image_id]
            path = source.image_path(image_id)
            anns = source.annotations[image_id]
            yield {
                "image": {"bytes": path.read_bytes(), "path": info["file_name"]},
                "image_id": image_id,
                "width": info["width"],
                "height": info["height"],
                "objects": {
                    "category": [a["category"] for a in anns],
                    "rle_counts": [a["rle"]["counts"] for a in anns],
                    "iscrowd": [a["iscrowd"] for a in anns],
                    "polygons": [[] for _ in anns],  # (load_coco rasterised them)
                },
            }

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for k, shard_ids in enumerate(tqdm(np.array_split(ids, num_shards), desc="shards", unit="shard")):
        shard = datasets.Dataset.from_generator(
            records, gen_kwargs={"shard_ids": [int(i) for i in shard_ids]}, features=FEATURES
        )
        shard.to_parquet(str(tmp / f"data-{k:05d}-of-{num_shards:05d}.parquet"))
    info = {"category_ids": source.category_ids, "category_names": source.category_names, "num_images": len(ids)}
    (tmp / SHARDS_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    replace_durably(tmp, out)  # the folder appears complete (and on disk) or not at all
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    masks = commands.add_parser("masks", help="images + mask images -> COCO instances JSON")
    masks.add_argument("images")
    masks.add_argument("masks")
    masks.add_argument("out")
    masks.add_argument("--encoding", required=True, choices=MASK_ENCODINGS)
    masks.add_argument("--classes", help="JSON: id2label, label2id, a list of names, or a transformers config.json")
    masks.add_argument("--panoptic-json", help="coco_panoptic: the panoptic annotations JSON")
    city = commands.add_parser("cityscapes", help="Cityscapes gtFine instance PNGs -> COCO instances JSON")
    city.add_argument("root")
    city.add_argument("--splits", nargs="+", default=["train", "val"])
    shards = commands.add_parser("shards", help="COCO folder -> Parquet shards in gd_hf's schema")
    shards.add_argument("annotations")
    shards.add_argument("images")
    shards.add_argument("out")
    shards.add_argument("--num-shards", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "masks":
            classes = Categories.from_file(args.classes) if args.classes else None
            coco = masks_to_coco(args.images, args.masks, args.encoding, classes, args.panoptic_json)
            print(write_json(coco, args.out))
        elif args.command == "cityscapes":
            for path in convert_cityscapes(args.root, args.splits):
                print(path)
        else:
            print(coco_to_shards(args.annotations, args.images, args.out, args.num_shards))
    except DataError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
