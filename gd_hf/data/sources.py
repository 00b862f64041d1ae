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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from gd_hf.config import DataConfig
from gd_hf.data.coco import FEATURES, PATH_FEATURES, DataError, _rle_from_segmentation, load_coco, to_hf_dataset
from gd_hf.data.convert import SHARDS_INFO_FILE

logger = logging.getLogger(__name__)

Records = datasets.Dataset | datasets.IterableDataset
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Categories:
    """The classes: contiguous id -> the source's category id (COCO id, written into results) and name."""

    ids: list[int]
    names: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))


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


# --- coco ---------------------------------------------------------------------------------------------------


RECORDS_CACHE_VERSION = 1  # bump when the records' schema or the parsing rules change
RECORDS_INFO_FILE = "gd_hf_records.json"


def records_cache_root(setting: str | None) -> Path | None:
    """The folder of `data.records_cache` (`auto`: under the `datasets` cache), or None for no cache."""
    if setting is None:
        return None
    return Path(datasets.config.HF_DATASETS_CACHE) / "gd_hf_records" if setting == "auto" else Path(setting)


def coco_records(annotation_file: str | Path, image_dir: str | Path, cache_root: Path | None) -> tuple[
    datasets.Dataset, Categories
]:  # fmt: skip
    """The gd_hf records of a COCO folder, and its categories: parsed and validated once (`load_coco`), then
    read from a memory-mapped `datasets` folder under `cache_root` (see `DataConfig.records_cache`).

    The cache key is the JSON's resolved path, size and modification time and the image folder: an edited JSON
    is parsed again. The parse runs in a child process, so the parsed JSON (GBs for COCO's train2017, which
    Python would keep in this process's heap) goes with it; the folder is written under a temporary name and
    renamed into place, so a reader sees all of it or none. In a multi-process launch the main process of each machine builds
    it first (`prepare_data`), the others read it.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if cache_root is None:
        source = load_coco(annotation_file, image_dir)
        return to_hf_dataset(source), Categories(source.category_ids, source.category_names)
    folder = records_cache_folder(annotation_file, image_dir, cache_root)
    if (folder / RECORDS_INFO_FILE).is_file():
        logger.info("%s: records read from the cache %s", annotation_file, folder)
    else:
        logger.info("%s: parsing (once; the records are cached in %s)", annotation_file, folder)
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"cannot write the records cache {cache_root} ({e}): set data.records_cache to a writable folder, "
                "or to null to parse the JSON at every launch"
            ) from e
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            child.submit(build_records_cache, annotation_file, image_dir, folder).result()  # re-raises DataError
    info = json.loads((folder / RECORDS_INFO_FILE).read_text())
    if info["skipped_annotations"]:  # said at every launch, also when read from the cache
        logger.warning(
            "%s: skipped %d annotations without usable segmentation: %s",
            annotation_file,
            info["skipped_annotations"],
            info["skip_reasons"],
        )
    records = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image())  # paths -> images
    return records, Categories(info["category_ids"], info["category_names"])


def records_cache_folder(annotation_file: Path, image_dir: Path, cache_root: Path) -> Path:
    """The cache folder of an instances JSON: a new one whenever the file's path, size or mtime changes."""
    if not annotation_file.is_file():
        raise DataError(f"annotation file {annotation_file} does not exist: check data.*_annotations in the recipe")
    stat = annotation_file.stat()
    key = json.dumps(
        [
            RECORDS_CACHE_VERSION,
            str(annotation_file.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            str(image_dir.resolve()),
        ]
    )
    return cache_root / f"{annotation_file.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def build_records_cache(annotation_file: Path, image_dir: Path, folder: Path) -> None:
    """Parse and validate an instances JSON (`load_coco`) and save its records to `folder` (atomically)."""
    logging.getLogger("gd_hf").setLevel(logging.ERROR)  # the parent says what was skipped, from the info file
    # Absolute image paths: the cache is found by resolved paths, so a launch from another working directory
    # (or naming the folder another way) reads it too.
    source = load_coco(annotation_file, image_dir.resolve())
    # Image paths as strings: save_to_disk would copy the files of an Image column into the folder.
    records = to_hf_dataset(source, features=PATH_FEATURES)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    records.save_to_disk(str(tmp))
    info = {
        "annotation_file": str(annotation_file),
        "category_ids": source.category_ids,
        "category_names": source.category_names,
        "skipped_annotations": source.skipped_annotations,
        "skip_reasons": source.skip_reasons,
    }
    (tmp / RECORDS_INFO_FILE).write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another launch wrote the same cache meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def open_coco(d: DataConfig) -> TrainVal:
    cache_root = records_cache_root(d.records_cache)
    train, categories = coco_records(d.train_annotations, d.train_images, cache_root)
    val, val_categories = coco_records(d.val_annotations, d.val_images, cache_root)
    if categories != val_categories:
        raise DataError(
            f"{d.train_annotations} and {d.val_annotations} list different categories: "
            f"{list(zip(categories.ids, categories.names))} vs {list(zip(val_categories.ids, val_categories.names))}"
        )
    return TrainVal(
        train=train,
        val=val,
        categories=categories,
        # From the cleaned records, not the raw JSON: what training accepts (a missing `iscrowd`, a box-only
        # `segmentation: []`, annotation id 0) evaluation accepts too, and any problem shows now, before step 1,
        # not at the first evaluation hours into a run.
        val_ground_truth=coco_ground_truth(val, categories),
        description=str(d.train_annotations),
    )


# --- shards -------------------------------------------------------------------------------------------------


def _shard_files(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder} holds no *.parquet shards (write some with `python -m gd_hf.data.convert shards`)")
    return files


def read_shards(folder: str | Path, streaming: bool) -> tuple[Records, Categories | None]:
    """Records of a shards folder (Parquet files or a save_to_disk folder) and the categories it names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"shards folder {folder} does not exist: check data.train_shards / data.val_shards")
    categories = None
    info_file = folder / SHARDS_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        categories = Categories([int(i) for i in info["category_ids"]], [str(n) for n in info["category_names"]])
    if (folder / "state.json").is_file():  # Dataset.save_to_disk
        records: Records = datasets.load_from_disk(str(folder))
        check_columns(records.features, str(folder))
        if streaming:
            records = records.to_iterable_dataset(num_shards=min(64, max(1, len(records))))
        return records, categories
    files = _shard_files(folder)
    schema = datasets.load_dataset("parquet", data_files=files[:1], split="train", streaming=True).features
    check_columns(schema, files[0])
    records = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming, features=FEATURES)
    return records, categories


def open_shards(d: DataConfig) -> TrainVal:
    if not d.train_shards or not d.val_shards:
        raise DataError("data.source: shards needs data.train_shards and data.val_shards (folders)")
    train, train_categories = read_shards(d.train_shards, d.streaming)
    val, val_categories = read_shards(d.val_shards, streaming=False)
    categories = train_categories or _named_categories(d, f"{d.train_shards}/{SHARDS_INFO_FILE}")
    if val_categories is not None and val_categories != categories:
        raise DataError(f"{d.train_shards} and {d.val_shards} name different categories")
    return TrainVal(
        train=train,
        val=val.cast_column("image", datasets.Image(decode=False)),
        categories=categories,
        val_ground_truth=coco_ground_truth(val, categories),
        description=str(d.train_shards),
    )


def _named_categories(d: DataConfig, where: str) -> Categories:
    if not d.category_names:
        raise DataError(f"no class names: write {where} or set data.category_names")
    return Categories(list(range(len(d.category_names))), list(d.category_names))


# --- hub ----------------------------------------------------------------------------------------------------


@dataclass
class HubRecordReader:
    """Turns a row of a hub data set into a gd_hf record (`data.hub_columns` names the columns)."""

    columns: dict[str, str]
    has_image_id: bool

    def __call__(self, row: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        c = self.columns
        image_id = row[c["image_id"]] if self.has_image_id else index
        cell = row.get(c["image"])
        if cell is None:
            raise DataError(f"row {image_id}: no image in column {c['image']!r}")
        try:
            with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]) as image:
                width, height = image.size
                image = {"bytes": cell.get("bytes"), "path": cell.get("path")}
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"row {image_id}: cannot read the image ({e})") from e
        objects = row.get(c["objects"])
        if objects is None:
            raise DataError(f"row {image_id}: no column {c['objects']!r}")
        if isinstance(objects, dict):  # a dict of lists -> a list of dicts
            keys = list(objects)
            objects = [dict(zip(keys, values)) for values in zip(*objects.values())]
        categories, counts, crowd = [], [], []
        for k, obj in enumerate(objects):
            if c["category"] not in obj or c["segmentation"] not in obj:
                raise DataError(f"row {image_id}, object {k}: no {c['category']!r} / {c['segmentation']!r} field")
            try:
                rle = _rle_from_segmentation(obj[c["segmentation"]], height, width)
            except ValueError:
                continue  # unusable geometry: skipped, as for COCO files
            categories.append(int(obj[c["category"]]))
            counts.append(rle["counts"])
            crowd.append(int(obj.get(c["iscrowd"], 0) or 0))
        return {
            "image": image,
            "image_id": int(image_id),
            "width": width,
            "height": height,
            "objects": {"category": categories, "rle_counts": counts, "iscrowd": crowd},
        }


def _hub_categories(features: datasets.Features, columns: dict[str, str], d: DataConfig) -> Categories:
    objects = features.get(columns["objects"])
    feature = None
    if isinstance(objects, datasets.Sequence | datasets.List):
        inner = objects.feature
        feature = inner.get(columns["category"]) if isinstance(inner, dict) else None
        if isinstance(feature, datasets.Sequence | datasets.List):
            feature = feature.feature
    elif isinstance(objects, dict):
        feature = objects.get(columns["category"])
        if isinstance(feature, datasets.Sequence | datasets.List):
            feature = feature.feature
    if isinstance(feature, datasets.ClassLabel):
        return Categories(list(range(feature.num_classes)), list(feature.names))
    return _named_categories(d, f"the ClassLabel of {columns['objects']}.{columns['category']}")


def open_hub(d: DataConfig) -> TrainVal:
    if not d.hub_dataset:
        raise DataError("data.source: hub needs data.hub_dataset (a data set id or a local folder)")
    columns = dataclasses.asdict(d.hub_columns)

    def load(split: str, streaming: bool) -> Records:
        try:
            return datasets.load_dataset(d.hub_dataset, split=split, revision=d.hub_revision, streaming=streaming)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise DataError(f"cannot load split {split!r} of {d.hub_dataset}: {e}") from e

    train = load(d.hub_train_split, d.streaming)
    features = train.features
    if features is not None:
        required = [columns["image"], columns["objects"]]
        missing = [name for name in required if name not in features]
        if missing:
            raise DataError(
                f"{d.hub_dataset} has no column(s) {missing} (its columns: {sorted(features)}): "
                "map them with data.hub_columns"
            )
    has_image_id = features is not None and columns["image_id"] in features
    if d.streaming and not has_image_id:
        raise DataError(
            f"{d.hub_dataset} has no image-id column {columns['image_id']!r}: streaming needs one to split labeled "
            "from unlabeled images; set data.hub_columns.image_id or data.streaming: false"
        )
    categories = _hub_categories(features, columns, d)
    reader = HubRecordReader(columns, has_image_id)
    keep = [columns["image"], columns["objects"]] + ([columns["image_id"]] if has_image_id else [])

    def canonical(records: Records, streaming: bool) -> Records:
        records = records.select_columns(keep).cast_column(columns["image"], datasets.Image(decode=False))
        if streaming:
            return records.map(reader, with_indices=True, features=FEATURES, remove_columns=keep)
        return records.map(reader, with_indices=True, features=FEATURES, remove_columns=keep, desc="hub records")

    val = canonical(load(d.hub_val_split, False), False)
    return TrainVal(
        train=canonical(train, d.streaming),
        val=val.cast_column("image", datasets.Image(decode=False)),
        categories=categories,
        val_ground_truth=coco_ground_truth(val, categories),
        description=f"{d.hub_dataset} ({d.hub_train_split})",
    )


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


def coco_ground_truth(records: datasets.Dataset, categories: Categories) -> COCO:
    """A pycocotools ground truth built from gd_hf records (area and box computed from the masks)."""
    images, annotations = [], []
    for row in records.select_columns(["image_id", "width", "height", "objects"]):
        images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
        objects = row["objects"]
        for category, counts, crowd in zip(objects["category"], objects["rle_counts"], objects["iscrowd"]):
            rle = {"size": [row["height"], row["width"]], "counts": counts.encode()}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": row["image_id"],
                    "category_id": categories.ids[category],
                    "segmentation": {"size": rle["size"], "counts": counts},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)],
        }
        ground_truth.createIndex()
    return ground_truth
