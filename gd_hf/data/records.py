"""What the record sources (`gd_hf.data.sources`) share: the train/val pair they open (`TrainVal`), the checks of
a record and of a data set's columns, the records of a plain image folder (`data.unlabeled_images`), and the image
ids and object counts the splits are drawn from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from gd_hf.data.categories import Categories
from gd_hf.data.coco import FEATURES, DataError
from gd_hf.data.convert import IMAGE_SUFFIXES

Records = datasets.Dataset | datasets.IterableDataset


@dataclass
class TrainVal:
    """A source opened: train records (map-style or streamed), val records (map-style), the classes, and the
    val ground truth for pycocotools (an annotation file, or built from the val records)."""

    train: Records
    val: datasets.Dataset
    categories: Categories
    val_ground_truth: COCO
    description: str


def check_columns(features: datasets.Features | None, where: str) -> None:
    """Fail at start when records lack (or add) columns of gd_hf's schema, naming them."""
    if features is None:
        return  # an untyped stream: records are checked one by one as they are read
    expected, found = set(FEATURES), set(features)
    if expected == found and isinstance(features["objects"], dict):
        expected = {f"objects.{key}" for key in FEATURES["objects"]}
        found = {f"objects.{key}" for key in features["objects"]}
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise DataError(
            f"{where} does not have gd_hf's record columns: missing {missing}, extra {extra}. Write shards with "
            "`python -m gd_hf.data.convert shards` (shards of gd_hf before objects.polygons: write them again), or "
            "use data.source: hub with data.hub_columns for other layouts."
        )


def check_record(example: dict[str, Any]) -> dict[str, Any]:
    """A record as read from a stream, checked field by field (streams may hold rows of a different shape)."""
    missing = [key for key in FEATURES if key not in example or example[key] is None]
    if missing:
        raise DataError(f"record {example.get('image_id', '?')} has no {missing}")
    objects = example["objects"]
    absent = [key for key in ("category", "rle_counts", "iscrowd", "polygons") if key not in objects]
    if absent:
        raise DataError(f"record {example['image_id']}: objects have no {absent}")
    return example


# --- image folder (unlabeled) -------------------------------------------------------------------------------


def image_folder_records(folder: str | Path) -> datasets.Dataset:
    """Every image under `folder` (recursively) as a record without labels; ids are -1, -2, ... (COCO ids are
    positive, so they never collide). Width/height 0 = read from the image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"unlabeled image folder {folder} does not exist: check data.unlabeled_images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{folder} holds no images ({sorted(IMAGE_SUFFIXES)})")
    empty = {"category": [], "rle_counts": [], "iscrowd": [], "polygons": []}
    return datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in paths],
            "image_id": [-(i + 1) for i in range(len(paths))],
            "width": [0] * len(paths),
            "height": [0] * len(paths),
            "objects": [empty] * len(paths),
        },
        features=FEATURES,
    )


# --- shared -------------------------------------------------------------------------------------------------


def image_ids_and_object_counts(records: Records) -> tuple[list[int], list[int]]:
    """Each record's image id and number of non-crowd objects, reading no image."""
    columns = records.select_columns(["image_id", "objects"])
    if isinstance(columns, datasets.Dataset):
        # In Arrow: the crowd flags only, counted per row with numpy. Building the objects in Python (the RLE
        # strings of ~860k objects at COCO size) took ~20 s at every launch.
        table = columns.with_format("arrow")[:]  # honours a row selection
        crowd = table.column("objects").combine_chunks().field("iscrowd")  # list<int8> per row
        lengths = pc.fill_null(pc.list_value_length(crowd), 0).to_numpy(zero_copy_only=False)
        flags = pc.list_flatten(crowd).to_numpy(zero_copy_only=False).astype(np.int64)
        crowded = np.bincount(np.repeat(np.arange(len(lengths)), lengths), weights=flags, minlength=len(lengths))
        return table.column("image_id").to_pylist(), (lengths - crowded).astype(int).tolist()
    ids, counts = [], []
    for row in tqdm(columns, desc="reading image ids", unit="rec", leave=False):
        ids.append(int(row["image_id"]))
        counts.append(sum(1 for c in row["objects"]["iscrowd"] if not c))
    return ids, counts


def select_ids(records: Records, image_ids: list[int], all_ids: list[int] | None = None) -> Records:
    """The records whose image id is in `image_ids` (map-style: by row, streams: a filter)."""
    wanted = set(image_ids)
    if isinstance(records, datasets.Dataset):
        all_ids = all_ids if all_ids is not None else records["image_id"]
        return records.select([row for row, image_id in enumerate(all_ids) if image_id in wanted])
    return records.filter(lambda image_id: image_id in wanted, input_columns=["image_id"])
