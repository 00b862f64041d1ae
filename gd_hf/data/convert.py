"""Conversions into what gd_hf reads: Cityscapes -> COCO format, COCO folder -> Parquet shards.

    python -m gd_hf.data.convert cityscapes CITYSCAPES_ROOT [--splits train val]
    python -m gd_hf.data.convert shards ANNOTATIONS IMAGES OUT [--num-shards 16]

**Cityscapes.** `CITYSCAPES_ROOT` holds `leftImg8bit/{split}/{city}/*_leftImg8bit.png` and
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

from gd_hf.data.coco import FEATURES, DataError, load_coco

logger = logging.getLogger(__name__)

CITYSCAPES_INSTANCE_CLASSES = {
    24: "person",
    25: "rider",
    26: "car",
    27: "truck",
    28: "bus",
    31: "train",
    32: "motorcycle",
    33: "bicycle",
}
SHARDS_INFO_FILE = "gd_hf_dataset.json"


def _coco_annotation(mask: np.ndarray, category_id: int, iscrowd: int) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "category_id": category_id,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
        "area": float(mask_utils.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": iscrowd,
    }


def cityscapes_to_coco(root: str | Path, split: str) -> dict[str, Any]:
    """The COCO instances dict of one Cityscapes split (see the module doc for the rules)."""
    root = Path(root)
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    if not image_root.is_dir():
        raise DataError(f"{image_root} does not exist: unpack leftImg8bit_trainvaltest.zip into {root}")
    if not label_root.is_dir():
        raise DataError(f"{label_root} does not exist: unpack gtFine_trainvaltest.zip into {root}")
    image_files = sorted(image_root.glob("*/*_leftImg8bit.png"))
    if not image_files:
        raise DataError(f"no */*_leftImg8bit.png under {image_root}")
    images, annotations = [], []
    for image_id, image_file in enumerate(tqdm(image_files, desc=f"cityscapes {split}", unit="img"), 1):
        stem = image_file.name[: -len("_leftImg8bit.png")]
        label_file = label_root / image_file.parent.name / f"{stem}_gtFine_instanceIds.png"
        if not label_file.is_file():
            raise DataError(f"{label_file} (labels of {image_file}) does not exist: is gtFine complete?")
        with Image.open(image_file) as image:
            width, height = image.size
        ids = np.asarray(Image.open(label_file))
        if ids.shape != (height, width):
            raise DataError(f"{label_file} is {ids.shape[1]}x{ids.shape[0]} but {image_file} is {width}x{height}")
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_file.parent.name}/{image_file.name}",
                "width": width,
                "height": height,
            }
        )
        for value in np.unique(ids):
            value = int(value)
            class_id = value // 1000 if value >= 1000 else value
            if class_id not in CITYSCAPES_INSTANCE_CLASSES:
                continue
            annotation = _coco_annotation(ids == value, class_id, iscrowd=int(value < 1000))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    categories = [{"id": i, "name": name} for i, name in CITYSCAPES_INSTANCE_CLASSES.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def convert_cityscapes(root: str | Path, splits: list[str]) -> list[Path]:
    """Write `root/annotations/instances_{split}.json` for each split; returns the files."""
    out_dir = Path(root) / "annotations"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        coco = cityscapes_to_coco(root, split)
        path = out_dir / f"instances_{split}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco))
        tmp.replace(path)  # never leave a half-written annotation file behind
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
    tmp.replace(out)  # the folder appears complete or not at all
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
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
        if args.command == "cityscapes":
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
