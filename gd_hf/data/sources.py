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
import psutil
import pyarrow.compute as pc
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from gd_hf.config import DataConfig
from gd_hf.data.categories import Categories
from gd_hf.data.coco import (
    FEATURES,
    PATH_FEATURES,
    DataError,
    _rle_from_segmentation,
    compressed_rle_problem,
    load_coco,
    to_hf_dataset,
)
from gd_hf.data.convert import IMAGE_SUFFIXES, SHARDS_INFO_FILE
from gd_hf.data.mask_images import (
    CITYSCAPES_INSTANCE_CLASSES,
    DROPS_OTHER_CLASSES,
    encode_objects,
    objects_from_mask,
    read_mask_array,
)
from gd_hf.files import replace_durably

logger = logging.getLogger(__name__)

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


# --- coco ---------------------------------------------------------------------------------------------------


RECORDS_CACHE_VERSION = 2  # bump when the records' schema or the parsing rules change (2: RLE and fields checked)
RECORDS_INFO_FILE = "gd_hf_records.json"


def records_cache_root(setting: str | None) -> Path | None:
    """The folder of `data.records_cache` (`auto`: under the `datasets` cache), or None for no cache."""
    if setting is None:
        return None
    return Path(datasets.config.HF_DATASETS_CACHE) / "gd_hf_records" if setting == "auto" else Path(setting)


def coco_records(
    annotation_file: str | Path, image_dir: str | Path, cache_root: Path | None, crowd_as_objects: bool = False
) -> tuple[datasets.Dataset, Categories]:
    """The gd_hf records of a COCO folder, and its categories: parsed and validated once (`load_coco`), then
    read from a memory-mapped `datasets` folder under `cache_root` (see `DataConfig.records_cache`).

    The cache key is the JSON's content (SHA-256), the image folder and `crowd_as_objects` (see `load_coco`): an
    edited JSON is parsed again. The parse runs in a child process, so the parsed JSON (GBs for COCO's train2017, which
    Python would keep in this process's heap) goes with it; the folder is written under a temporary name and
    renamed into place, so a reader sees all of it or none. In a multi-process launch the main process of each machine builds
    it first (`prepare_data`), the others read it.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if cache_root is None:
        source = load_coco(annotation_file, image_dir, crowd_as_objects=crowd_as_objects)
        return to_hf_dataset(source), Categories(source.category_ids, source.category_names)
    folder = records_cache_folder(annotation_file, image_dir, cache_root, crowd_as_objects)
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
        remove_abandoned_builds(folder)
        try:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                # (.result() re-raises the child's DataError here)
                child.submit(build_records_cache, annotation_file, image_dir, folder, crowd_as_objects).result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise DataError(
                f"{annotation_file}: the process parsing it died ({e}), most likely killed for memory. Look for "
                "absurd records (huge sizes or coordinates), or free memory and launch again"
            ) from e
    info = json.loads((folder / RECORDS_INFO_FILE).read_text())
    if info["skipped_annotations"]:  # said at every launch, also when read from the cache
        logger.warning(
            "%s: skipped %d annotations without usable segmentation: %s",
            annotation_file,
            info["skipped_annotations"],
            info["skip_reasons"],
        )
    try:
        categories = Categories(info["category_ids"], info["category_names"])
    except DataError as e:  # a cache written before the COCO reader checked its categories
        raise DataError(f"{annotation_file} (records cache {folder}): {e}") from e
    records = datasets.load_from_disk(str(folder)).cast_column("image", datasets.Image())  # paths -> images
    return records, categories


def records_cache_folder(
    annotation_file: Path, image_dir: Path, cache_root: Path, crowd_as_objects: bool = False
) -> Path:
    """The cache folder of an instances JSON: a new one whenever the file's content changes (its SHA-256, ~0.3 s
    per 400 MB here: an edit that keeps the file's size and modification time is still seen), or the image
    folder, or `crowd_as_objects`."""
    if not annotation_file.is_file():
        raise DataError(f"annotation file {annotation_file} does not exist: check data.*_annotations in the recipe")
    digest = hashlib.sha256()
    with annotation_file.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    key = json.dumps(
        [RECORDS_CACHE_VERSION, digest.hexdigest(), str(image_dir.resolve())]
        + (["crowd_as_objects"] if crowd_as_objects else [])
    )
    return cache_root / f"{annotation_file.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def remove_abandoned_builds(folder: Path) -> None:
    """Delete the half-written builds of `folder` whose process is gone (a child killed mid-write, e.g. by the
    OOM killer: its `.NAME.tmpPID` folder holds GBs); a build whose process still runs is left to finish."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            logger.info("removing %s, left by a records build that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def build_records_cache(annotation_file: Path, image_dir: Path, folder: Path, crowd_as_objects: bool = False) -> None:
    """Parse and validate an instances JSON (`load_coco`) and save its records to `folder` (atomically)."""
    logging.getLogger("gd_hf").setLevel(logging.ERROR)  # the parent says what was skipped, from the info file
    # Absolute image paths: the cache is found by resolved paths, so a launch from another working directory
    # (or naming the folder another way) reads it too.
    source = load_coco(annotation_file, image_dir.resolve(), crowd_as_objects=crowd_as_objects)
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
        replace_durably(tmp, folder)
    except OSError:  # another launch wrote the same cache meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def open_coco(d: DataConfig) -> TrainVal:
    cache_root = records_cache_root(d.records_cache)
    crowd = d.crowd_masks_as_objects
    train, categories = coco_records(d.train_annotations, d.train_images, cache_root, crowd)
    val, val_categories = coco_records(d.val_annotations, d.val_images, cache_root, crowd)
    if categories != val_categories:
        raise DataError(
            f"{d.train_annotations} and {d.val_annotations} list different categories: "
            f"{list(zip(categories.ids, categories.names))} vs {list(zip(val_categories.ids, val_categories.names))}"
        )
    per_category, crowd_objects = object_statistics(train, len(categories.ids))
    if crowd_objects > per_category.sum():
        described = "all" if not per_category.any() else f"{crowd_objects} of {crowd_objects + per_category.sum()}"
        logger.warning(
            "%s: %s objects are crowd regions (iscrowd: 1), which are never training targets. Labeling tools such "
            "as CVAT export every mask instance so: set data.crowd_masks_as_objects: true to train on them.",
            d.train_annotations,
            f"all {crowd_objects}" if described == "all" else described,
        )
    empty = [i for i in range(len(categories.ids)) if per_category[i] == 0]
    if empty and per_category.any():
        described = [f"{categories.names[i]} (id {categories.ids[i]})" for i in empty]
        if d.drop_empty_categories:
            logger.warning(
                "%s: dropping %d categories no training annotation uses: %s", d.train_annotations, len(empty), described
            )
            train, val, categories = drop_categories(train, val, categories, set(empty), str(d.val_annotations))
        else:
            logger.warning(
                "%s: %d categories have no training annotation: %s. They stay in the class list (the model can "
                "never learn them); data.drop_empty_categories: true drops them.",
                d.train_annotations,
                len(empty),
                described,
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


def object_statistics(records: datasets.Dataset, num_classes: int) -> tuple[np.ndarray, int]:
    """Non-crowd objects per class (an array of `num_classes` counts) and the number of crowd objects; in Arrow."""
    objects = records.select_columns(["objects"]).with_format("arrow")[:].column("objects").combine_chunks()
    classes = pc.list_flatten(objects.field("category")).to_numpy(zero_copy_only=False)
    crowd = pc.list_flatten(objects.field("iscrowd")).to_numpy(zero_copy_only=False).astype(bool)
    return np.bincount(classes[~crowd], minlength=num_classes), int(crowd.sum())


def drop_categories(
    train: datasets.Dataset, val: datasets.Dataset, categories: Categories, dropped: set[int], val_where: str
) -> tuple[datasets.Dataset, datasets.Dataset, Categories]:
    """Remove classes from the class list: the remaining ones renumbered 0..C'-1, objects of removed classes
    removed (in val too: said with a count)."""
    new_id = {old: new for new, old in enumerate(i for i in range(len(categories.ids)) if i not in dropped)}
    removed_from_val = [0]

    def renumber(objects_batch: list[dict], count: list[int] | None) -> dict[str, list]:
        out = []
        for objects in objects_batch:
            keep = [k for k, c in enumerate(objects["category"]) if c in new_id]
            if count is not None:
                count[0] += len(objects["category"]) - len(keep)
            out.append(
                {
                    "category": [new_id[objects["category"][k]] for k in keep],
                    "rle_counts": [objects["rle_counts"][k] for k in keep],
                    "iscrowd": [objects["iscrowd"][k] for k in keep],
                }
            )
        return {"objects": out}

    train = train.map(renumber, input_columns=["objects"], batched=True, fn_kwargs={"count": None}, desc="drop classes")
    val = val.map(
        renumber,
        input_columns=["objects"],
        batched=True,
        fn_kwargs={"count": removed_from_val},
        load_from_cache_file=False,
    )
    if removed_from_val[0]:
        logger.warning(
            "%s: removed %d objects of the dropped categories from the evaluation", val_where, removed_from_val[0]
        )
    kept = sorted(new_id)
    return train, val, Categories([categories.ids[i] for i in kept], [categories.names[i] for i in kept])


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
        try:
            categories = Categories([int(i) for i in info["category_ids"]], [str(n) for n in info["category_names"]])
        except DataError as e:
            raise DataError(f"{info_file}: {e}") from e
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


SKIPPED = "skipped"  # a temporary column of map-style hub records: why objects were skipped (counted, then dropped)


@dataclass
class HubRecordReader:
    """Turns a row of a hub data set into a gd_hf record (`data.hub_columns` names the columns).

    Objects come from the objects column (polygons, RLE, or dense H x W 0/1 masks) or, with `mask_encoding`, from
    a mask image (`gd_hf.data.mask_images`). Classes are checked against the class list (ints in 0..C-1, or
    names); unusable geometry is skipped and its reason kept in the `skipped` column when `report_skipped`."""

    columns: dict[str, str]
    has_image_id: bool
    categories: Categories
    mask_encoding: str | None = None
    report_skipped: bool = False
    warned: bool = False  # streamed: a worker says once that it skips objects

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
        if self.mask_encoding is not None:
            categories, counts, crowd, skipped = self._objects_from_mask(row, image_id, height, width)
        else:
            categories, counts, crowd, skipped = self._objects_from_column(row, image_id, height, width)
        record = {
            "image": image,
            "image_id": int(image_id),
            "width": width,
            "height": height,
            "objects": {"category": categories, "rle_counts": counts, "iscrowd": crowd},
        }
        if self.report_skipped:
            record[SKIPPED] = skipped
        elif skipped and not self.warned:  # streamed: said once per worker, not per record
            logger.warning(
                "%s: row %s: skipped objects (%s); later skips are not reported",
                c["mask"] if self.mask_encoding else c["objects"],
                image_id,
                skipped,
            )
            self.warned = True
        return record

    def _objects_from_column(self, row, image_id, height, width):
        c = self.columns
        objects = row.get(c["objects"])
        if objects is None:
            raise DataError(f"row {image_id}: no column {c['objects']!r}")
        if isinstance(objects, dict):  # a dict of lists -> a list of dicts
            keys = list(objects)
            objects = [dict(zip(keys, values)) for values in zip(*objects.values())]
        categories, counts, crowd, skipped = [], [], [], []
        for k, obj in enumerate(objects):
            if c["category"] not in obj or c["segmentation"] not in obj:
                raise DataError(f"row {image_id}, object {k}: no {c['category']!r} / {c['segmentation']!r} field")
            category = self._category(obj[c["category"]], f"row {image_id}, object {k}")
            segmentation = obj[c["segmentation"]]
            try:
                if _is_dense_mask(segmentation, height, width):
                    mask = np.asfortranarray((np.asarray(segmentation) != 0).astype(np.uint8))  # 0/1, 0/255, bool
                    rle = mask_utils.encode(mask)
                    if mask_utils.area(rle) == 0:
                        raise ValueError("empty mask (zero area)")
                    rle = {"counts": rle["counts"].decode()}
                else:
                    rle = _rle_from_segmentation(segmentation, height, width)
            except ValueError as e:
                skipped.append(str(e))  # unusable geometry: skipped and counted, as for COCO files
                continue
            categories.append(category)
            counts.append(rle["counts"])
            crowd.append(int(obj.get(c["iscrowd"], 0) or 0))
        return categories, counts, crowd, skipped

    def _objects_from_mask(self, row, image_id, height, width):
        c = self.columns
        cell = row.get(c["mask"])
        if cell is None:
            raise DataError(f"row {image_id}: no mask image in column {c['mask']!r} (data.hub_columns.mask)")
        where = f"row {image_id}, column {c['mask']!r}"
        try:
            array = read_mask_array(cell)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: cannot read the mask image ({e})") from e
        if array.shape[:2] != (height, width):
            raise DataError(f"{where}: the mask is {array.shape[1]}x{array.shape[0]} but the image {width}x{height}")
        table = self.categories
        objects = objects_from_mask(
            array,
            self.mask_encoding,
            instance_classes=row.get(c["instance_classes"]),
            segments_info=row.get(c["segments_info"]),
            single_class=table.ids[0] if len(table.ids) == 1 else None,
            where=where,
        )
        converted = encode_objects(objects, table, where, self.mask_encoding in DROPS_OTHER_CLASSES)
        skipped = [reason for reason, n in converted.dropped.items() for _ in range(n)]
        return converted.categories, converted.rle_counts, converted.iscrowd, skipped

    def _category(self, value: Any, where: str) -> int:
        """A class as stored (an int in 0..C-1, or a name) -> its contiguous id; anything else is a DataError."""
        names, ids = self.categories.names, self.categories.ids
        if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            if value not in names:
                raise DataError(f"{where}: class {value!r} is not one of the class names {names}")
            return names.index(value)
        try:
            category = int(value)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: class {value!r} is neither a class id nor a name") from e
        if category not in ids:
            raise DataError(
                f"{where}: class id {category} is not in the class list {dict(zip(ids, names))}: fix "
                "data.category_names / data.classes_file / the ClassLabel, or the data"
            )
        return ids.index(category)


def _is_dense_mask(segmentation: Any, height: int, width: int) -> bool:
    """An H x W array or nested list (any values: nonzero is the object), not polygons (a few coordinate lists,
    never H lists of W numbers each)."""
    if isinstance(segmentation, np.ndarray):
        return segmentation.shape == (height, width)
    if not (isinstance(segmentation, list) and len(segmentation) == height and segmentation):
        return False
    return all(isinstance(r, list | np.ndarray) and len(r) == width for r in segmentation)


def _hub_categories(records: Records, columns: dict[str, str], d: DataConfig, val: Records | None = None) -> Categories:
    """The classes of a hub data set, in this order of precedence: `data.classes_file`; for an objects column its
    ClassLabel, else `data.category_names`; for mask images a `semantic_class_to_id` column (the same in train
    and val), `data.category_names`, or Cityscapes' instance classes (`mask_encoding: cityscapes`)."""
    if d.mask_encoding is None:
        if d.classes_file:
            return Categories.from_file(d.classes_file)
        features = records.features or {}
        objects = features.get(columns["objects"])
        feature = None
        if isinstance(objects, datasets.Sequence | datasets.List):
            inner = objects.feature
            feature = inner.get(columns["category"]) if isinstance(inner, dict) else None
        elif isinstance(objects, dict):
            feature = objects.get(columns["category"])
        if isinstance(feature, datasets.Sequence | datasets.List):
            feature = feature.feature
        if isinstance(feature, datasets.ClassLabel):
            return Categories(list(range(feature.num_classes)), list(feature.names))
        return _named_categories(d, f"the ClassLabel of {columns['objects']}.{columns['category']}")
    table = _mask_categories(records, columns, d, val)
    if d.mask_encoding == "semantic_instance_channels":
        table = table.without_background(d.classes_file or d.hub_dataset or "the class list")
    return table


def _mask_categories(records: Records, columns: dict[str, str], d: DataConfig, val: Records | None) -> Categories:
    if d.classes_file:
        return Categories.from_file(d.classes_file)
    column = columns["semantic_class_to_id"]
    if column in (records.features or {}):

        def first_mapping(split: Records) -> dict:
            mapping = next(iter(split.select_columns([column])))[column]
            return json.loads(mapping) if isinstance(mapping, str) else dict(mapping)

        mapping = first_mapping(records)
        if val is not None and column in (val.features or {}) and first_mapping(val) != mapping:
            raise DataError(
                f"{d.hub_dataset}: the {column!r} of the train split and of the val split differ "
                f"({mapping} vs {first_mapping(val)}): the class ids must mean the same in both"
            )
        return Categories.from_mapping(mapping, column)
    if d.category_names:
        names = list(d.category_names)
        if d.mask_encoding == "semantic_instance_channels" and names[0].lower() not in ("background", "_background_"):
            return Categories(list(range(1, len(names) + 1)), names)  # 0 is background in this encoding
        return Categories.from_mapping(dict(enumerate(names)), "data.category_names")
    if d.mask_encoding == "cityscapes":
        return Categories(list(CITYSCAPES_INSTANCE_CLASSES), list(CITYSCAPES_INSTANCE_CLASSES.values()))
    raise DataError(
        f"no class names for the mask images of {d.hub_dataset}: set data.classes_file (an id2label JSON) or "
        f"data.category_names, or add a {column!r} column"
    )


def open_hub(d: DataConfig) -> TrainVal:
    if not d.hub_dataset:
        raise DataError("data.source: hub needs data.hub_dataset (a data set id or a local folder)")
    columns = dataclasses.asdict(d.hub_columns)

    def load(split: str, streaming: bool) -> Records:
        folder = Path(d.hub_dataset)
        if (folder / "dataset_dict.json").is_file():  # a DatasetDict.save_to_disk folder (load_dataset refuses it)
            saved = datasets.load_from_disk(str(folder))
            if split not in saved:
                raise DataError(f"{folder} has no split {split!r} (its splits: {sorted(saved)}): set data.hub_*_split")
            records = saved[split]
            return records.to_iterable_dataset(num_shards=min(64, max(1, len(records)))) if streaming else records
        try:
            return datasets.load_dataset(d.hub_dataset, split=split, revision=d.hub_revision, streaming=streaming)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise DataError(f"cannot load split {split!r} of {d.hub_dataset}: {e}") from e

    train = load(d.hub_train_split, d.streaming)
    features = train.features
    objects_column = columns["mask"] if d.mask_encoding else columns["objects"]
    if features is not None:
        missing = [name for name in (columns["image"], objects_column) if name not in features]
        if missing:
            raise DataError(
                f"{d.hub_dataset} has no column(s) {missing} (its columns: {sorted(features)}): "
                "map them with data.hub_columns" + ("" if d.mask_encoding else " (mask images: set data.mask_encoding)")
            )
    has_image_id = features is not None and columns["image_id"] in features
    if d.streaming and not has_image_id:
        raise DataError(
            f"{d.hub_dataset} has no image-id column {columns['image_id']!r}: streaming needs one to split labeled "
            "from unlabeled images; set data.hub_columns.image_id or data.streaming: false"
        )
    val_raw = load(d.hub_val_split, False)
    categories = _hub_categories(train, columns, d, val_raw)
    keep = [columns["image"], objects_column] + ([columns["image_id"]] if has_image_id else [])
    if d.mask_encoding and features is not None:
        keep += [columns[k] for k in ("instance_classes", "segments_info") if columns[k] in features]

    def canonical(records: Records, streaming: bool, split: str) -> Records:
        records = records.select_columns(keep).cast_column(columns["image"], datasets.Image(decode=False))
        if d.mask_encoding:
            records = records.cast_column(columns["mask"], datasets.Image(decode=False))
        reader = HubRecordReader(columns, has_image_id, categories, d.mask_encoding, report_skipped=not streaming)
        if streaming:
            return records.map(reader, with_indices=True, features=FEATURES, remove_columns=keep)
        features = datasets.Features({**FEATURES, SKIPPED: datasets.List(datasets.Value("string"))})
        records = records.map(reader, with_indices=True, features=features, remove_columns=keep, desc="hub records")
        _report_skipped(records[SKIPPED], f"{d.hub_dataset} ({split})")
        return records.remove_columns(SKIPPED)

    val = canonical(val_raw, False, d.hub_val_split)
    return TrainVal(
        train=canonical(train, d.streaming, d.hub_train_split),
        val=val.cast_column("image", datasets.Image(decode=False)),
        categories=categories,
        val_ground_truth=coco_ground_truth(val, categories),
        description=f"{d.hub_dataset} ({d.hub_train_split})",
    )


def _report_skipped(reasons_per_row: list[list[str]], where: str) -> None:
    """Skipped objects, counted by reason, said as the COCO path says them."""
    counts: dict[str, int] = {}
    for reasons in reasons_per_row:
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    if counts:
        logger.warning("%s: skipped %d objects: %s", where, sum(counts.values()), counts)


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


def ground_truth_from_json(annotation_file: str | Path) -> COCO:
    """The pycocotools ground truth of a COCO instances JSON as gd_hf reads it (`load_coco`: polygons, RLE, missing
    `iscrowd`, box-only and empty objects, any ids), not as pycocotools would read the raw file."""
    source = load_coco(annotation_file, Path(annotation_file).parent, check_images=False)
    return coco_ground_truth(to_hf_dataset(source), Categories(source.category_ids, source.category_names))


def coco_ground_truth(records: datasets.Dataset, categories: Categories) -> COCO:
    """A pycocotools ground truth built from gd_hf records (area and box computed from the masks)."""
    images, annotations = [], []
    for row in records.select_columns(["image_id", "width", "height", "objects"]):
        images.append({"id": row["image_id"], "width": row["width"], "height": row["height"]})
        objects = row["objects"]
        for category, counts, crowd in zip(objects["category"], objects["rle_counts"], objects["iscrowd"]):
            # Val is read whole here, at start: a mask that is not one (shards, hub data sets) stops the run now,
            # not at the first evaluation hours in.
            problem = compressed_rle_problem(counts, row["height"], row["width"])
            if problem:
                raise DataError(f"val image id {row['image_id']}: an object's mask is not valid: {problem}")
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
