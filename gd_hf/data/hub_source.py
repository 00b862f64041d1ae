"""The `hub` source: a data set on the Hub (or a local folder `load_dataset` reads, or a `DatasetDict.save_to_disk`
folder) whose columns `data.hub_columns` maps: objects in a column (polygons, RLE, dense masks) or in mask images
(`data.mask_encoding`, read by `gd_hf.data.mask_images`). See `gd_hf.data.sources` for the columns."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.config import DataConfig
from gd_hf.data.categories import Categories, named_categories
from gd_hf.data.coco import FEATURES, DataError
from gd_hf.data.ground_truth import coco_ground_truth
from gd_hf.data.mask_images import (
    CITYSCAPES_INSTANCE_CLASSES,
    DROPS_OTHER_CLASSES,
    encode_objects,
    objects_from_mask,
    read_mask_array,
)
from gd_hf.data.masks import rle_from_segmentation
from gd_hf.data.records import Records, TrainVal

logger = logging.getLogger(__name__)


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
            "objects": {"category": categories, "rle_counts": counts, "iscrowd": crowd, "polygons": [[]] * len(counts)},
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
                    rle = rle_from_segmentation(segmentation, height, width)
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
        return named_categories(d, f"the ClassLabel of {columns['objects']}.{columns['category']}")
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
