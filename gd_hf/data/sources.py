"""Where the records come from (`data.source`), read as `datasets` data sets — map-style or streamed.

Every source ends as *gd_hf records* (`gd_hf.data.coco.FEATURES`: image, image_id, width, height,
objects{category, rle_counts, iscrowd}, categories contiguous 0..C-1):

- `coco`: a COCO folder (image folder + instances JSON), read and validated by `load_coco`.
- `shards`: a folder of Parquet files in that schema (`python -m gd_hf.data.convert shards`, or any
  `Dataset.to_parquet` / `push_to_hub` of such records) with `gd_hf_dataset.json` naming the categories, or a
  `Dataset.save_to_disk` folder of them.
- `hub`: a data set on the Hub (or a local folder `load_dataset` reads) whose columns are mapped by
  `data.hub_columns`: an image column, an objects column (a list of dicts or a dict of lists) with a class
  field (int or ClassLabel) and a segmentation field (COCO polygons or RLE `{size, counts}`), optionally an
  image-id column and an iscrowd field. Class names come from the ClassLabel feature or `data.category_names`.
- `data.unlabeled_images`: a plain folder of images added to the unlabeled split (no labels at all).

The val split is always map-style (evaluation needs all of it anyway). With `data.streaming: true`, the train
split is an `IterableDataset`: the labeled stream is the train stream filtered to the labeled ids, the
unlabeled stream all of it (or the rest). Splitting needs the image ids: they are read once at start from the
id and objects columns only (no image is decoded).

Each source has its module: `coco_source` (with the records cache), `shards`, `hub_source`. This one holds what
they share (`TrainVal`, the record checks), opens `data.source` (`open_source`), reads the unlabeled image
folder, and reads and selects the records' image ids for the splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from gd_hf.config import DataConfig
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
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise DataError(
            f"{where} does not have gd_hf's record columns: missing {missing}, extra {extra}. Write shards with "
            "`python -m gd_hf.data.convert shards`, or use data.source: hub with data.hub_columns for other layouts."
        )


def check_record(example: dict[str, Any]) -> dict[str, Any]:
    """A record as read from a stream, checked field by field (streams may hold rows of a different shape)."""
    missing = [key for key in FEATURES if key not in example or example[key] is None]
    if missing:
        raise DataError(f"record {example.get('image_id', '?')} has no {missing}")
    objects = example["objects"]
    absent = [key for key in ("category", "rle_counts", "iscrowd") if key not in objects]
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
    empty = {"category": [], "rle_counts": [], "iscrowd": []}
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


def open_source(d: DataConfig) -> TrainVal:
    """Open `data.source` (see the module doc)."""
    # The source modules import this one (TrainVal, the checks): imported here, not at the top.
    from gd_hf.data.coco_source import open_coco
    from gd_hf.data.hub_source import open_hub
    from gd_hf.data.shards import open_shards

    opened = {"coco": open_coco, "shards": open_shards, "hub": open_hub}[d.source](d)
    if d.streaming and isinstance(opened.train, datasets.Dataset):
        # One shard per worker of every process at least; more lets the shard order shuffle too.
        opened.train = opened.train.to_iterable_dataset(num_shards=min(64, max(1, len(opened.train))))
    # Images are decoded by the training datasets, so a bad file is skipped or reported by us, not datasets.
    opened.train = opened.train.cast_column("image", datasets.Image(decode=False))
    return opened


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
