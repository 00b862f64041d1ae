"""Where the records come from (`data.source`), read as `datasets` data sets — map-style or streamed.

Every source ends as *gd_hf records* (`gd_hf.data.coco.FEATURES`: image, image_id, width, height,
objects{category, rle_counts, iscrowd, polygons}, categories contiguous 0..C-1):

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

Each source has its module: `coco_source` (with the records cache), `shards`, `hub_source`; what they share
(`TrainVal`, the record checks, the unlabeled image folder, the ids for the splits) is `gd_hf.data.records`. This
one opens `data.source` (`open_source`).
"""

from __future__ import annotations

import datasets

from gd_hf.config import DataConfig
from gd_hf.data.coco_source import open_coco
from gd_hf.data.hub_source import open_hub
from gd_hf.data.records import TrainVal
from gd_hf.data.shards import open_shards


def open_source(d: DataConfig) -> TrainVal:
    """Open `data.source` (see the module doc)."""
    opened = {"coco": open_coco, "shards": open_shards, "hub": open_hub}[d.source](d)
    if d.streaming and isinstance(opened.train, datasets.Dataset):
        # One shard per worker of every process at least; more lets the shard order shuffle too.
        opened.train = opened.train.to_iterable_dataset(num_shards=min(64, max(1, len(opened.train))))
    # Images are decoded by the training datasets, so a bad file is skipped or reported by us, not datasets.
    opened.train = opened.train.cast_column("image", datasets.Image(decode=False))
    return opened
