"""The class list of a data set (`Categories`): source class ids and names, contiguous ids 0..C-1 by position;
read from an id2label / label2id mapping or a class file (id2label JSON, list of names, config.json, COCO JSON),
or named by `data.category_names`. On records: objects per class, and dropping classes."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError

logger = logging.getLogger(__name__)


@dataclass
class Categories:
    """The classes: the source's class ids (COCO category ids, values in mask images; written into results) and
    names, in the order of the contiguous ids 0..C-1 the model is trained with."""

    ids: list[int]
    names: list[str]
    contiguous: dict[int, int] = field(init=False, repr=False, compare=False)  # source id -> contiguous id

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise DataError(f"class list: {len(self.ids)} ids but {len(self.names)} names")
        if len(set(self.ids)) != len(self.ids):
            raise DataError(f"class list: an id appears twice in {self.ids}")
        self.contiguous = {source: i for i, source in enumerate(self.ids)}

    @property
    def id2label(self) -> dict[int, str]:
        """The model config's id2label: contiguous id -> name."""
        return dict(enumerate(self.names))

    @classmethod
    def from_mapping(cls, mapping: Mapping[Any, Any], where: str) -> Categories:
        """An id2label `{id: name}` or a label2id `{name: id}` (transformers' `semantic_class_to_id`), sorted by
        id; class 0 named `background` (the transformers example's convention) is not a class."""
        items = list(mapping.items())
        if not items:
            raise DataError(f"{where}: the class table is empty")
        if all(_is_int(key) for key, _ in items):
            pairs = [(int(key), str(value)) for key, value in items]
        elif all(_is_int(value) for _, value in items):
            pairs = [(int(value), str(key)) for key, value in items]
        else:
            raise DataError(f"{where}: a class table maps ids to names ({{1: 'cat'}}) or names to ids; got {items[:3]}")
        pairs = sorted(p for p in pairs if not (p[0] == 0 and p[1].lower() in ("background", "_background_")))
        return cls([i for i, _ in pairs], [n for _, n in pairs])

    @classmethod
    def from_file(cls, path: str | Path) -> Categories:
        """A JSON file: id2label / label2id dict, a list of names (ids 0..C-1), a transformers config.json, or
        COCO categories (a list of `{id, name[, isthing]}`, or a COCO / panoptic JSON: its thing categories)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"class file {path} does not exist")
        try:
            content = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"class file {path} is not valid JSON: {e}") from e
        if isinstance(content, dict) and isinstance(content.get("id2label"), dict):  # a transformers config.json
            content = content["id2label"]
        if isinstance(content, dict) and isinstance(content.get("categories"), list):  # a COCO / panoptic JSON
            content = content["categories"]
        if isinstance(content, list) and content and all(isinstance(c, dict) for c in content):
            # COCO categories: the thing classes (panoptic's `isthing: 0` stuff classes are not instances)
            content = {c["id"]: c["name"] for c in content if c.get("isthing", 1)}
        elif isinstance(content, list):
            content = dict(enumerate(content))
        if not isinstance(content, dict):
            raise DataError(f"class file {path}: expected a JSON object (id2label) or a list of names")
        return cls.from_mapping(content, str(path))

    def without_background(self, where: str) -> Categories:
        """The table without id 0, for encodings where 0 is background (semantic_instance_channels): a class 0
        named otherwise could never be learned (its pixels are background), so it is dropped with a warning."""
        if 0 not in self.contiguous:
            return self
        logger.warning(
            "%s: class id 0 (%r) is background in this mask encoding: it is not a class. (A transformers "
            "config.json of a model trained with do_reduce_labels numbers its classes from 0: give the data set's "
            "own label2id instead.)",
            where,
            self.names[self.contiguous[0]],
        )
        kept = [(i, n) for i, n in zip(self.ids, self.names) if i != 0]
        return Categories([i for i, _ in kept], [n for _, n in kept])

    def contiguous_id(self, source_id: int) -> int | None:
        return self.contiguous.get(int(source_id))


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def named_categories(d: DataConfig, where: str) -> Categories:
    """The classes of `data.category_names` (ids 0..C-1); without them, an error naming `where` (the file that
    would name them)."""
    if not d.category_names:
        raise DataError(f"no class names: write {where} or set data.category_names")
    return Categories(list(range(len(d.category_names))), list(d.category_names))


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
                    "polygons": [objects["polygons"][k] for k in keep],
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
