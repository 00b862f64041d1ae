"""Masks stored as images (`data.mask_encoding`): one reader for every source and for the `masks` converter.

An annotation image holds all objects of its image; the encoding says how to read it:

- `semantic_instance_channels`: transformers' instance-segmentation example (and `scene_parse_150`): an RGB PNG
  whose channel 0 is the semantic class and channel 1 the instance id (channel 2 zeros). An object is a distinct
  (class, instance) pair with instance != 0; class 0 is background (the example's `label2id` and ADE20K).
- `instance_ids`: one channel, each pixel an instance id 1..N (0 = background); the class of each instance from a
  per-image table `{instance id: class}`, or, for a single-class data set (cells, nuclei), that one class.
- `cityscapes`: one channel, `class * 1000 + k` for instance k of an instance class; a bare `class` value of an
  instance class is a group the annotators did not separate (a crowd region). Other classes are dropped.
- `coco_panoptic`: an RGB PNG, segment id = R + 256 G + 256^2 B (0 = void), with the image's `segments_info`
  (`id`, `category_id`, `iscrowd`) from the panoptic JSON; segments of classes outside the class list (the
  "stuff" classes) are dropped.

Classes are given as `Categories` (source class id -> name, contiguous ids 0..C-1 in that order), from the data
set (a `semantic_class_to_id` column, a ClassLabel, an id2label JSON) or the recipe (`data.category_names`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from gd_hf.data.categories import Categories
from gd_hf.data.coco import DataError

logger = logging.getLogger(__name__)

MASK_ENCODINGS = ("semantic_instance_channels", "instance_ids", "cityscapes", "coco_panoptic")
# Cityscapes' instance classes (label ids of cityscapesScripts' labels.py).
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


@dataclass
class MaskObject:
    """One object read from a mask image: its source class id, whether it is a crowd region, its mask."""

    class_id: int
    iscrowd: int
    mask: np.ndarray  # (H, W) bool


def read_mask_array(image: Any) -> np.ndarray:
    """A mask image (PIL image, or path / bytes via PIL) as its raw integer values: 16-bit PNGs and palette PNGs
    keep their ids (no conversion to RGB or L)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, dict):  # a datasets Image cell with decode=False
        import io

        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"])
    elif isinstance(image, str | Path):
        image = Image.open(image)
    with image:
        array = np.asarray(image)
    return array.astype(np.int64) if array.dtype != np.int64 else array


def objects_from_mask(
    array: np.ndarray,
    encoding: str,
    *,
    instance_classes: Mapping[Any, Any] | None = None,
    segments_info: list[dict[str, Any]] | None = None,
    single_class: int | None = None,
    where: str = "mask",
) -> list[MaskObject]:
    """The objects of one mask image (see the module doc for each encoding), in ascending id order.

    instance_classes: `instance_ids` only, `{instance id: class id}` of this image (keys may be strings, as in
    JSON); single_class: `instance_ids` without a table: every instance is of this class.
    segments_info: `coco_panoptic` only, the image's segments from the panoptic JSON."""
    if encoding == "semantic_instance_channels":
        if array.ndim != 3 or array.shape[2] < 2:
            raise DataError(
                f"{where}: semantic_instance_channels needs an image with >= 2 channels (class, instance), got shape "
                f"{array.shape}"
            )
        semantic, instance = array[..., 0], array[..., 1]
        pairs = np.unique(np.stack([instance.ravel(), semantic.ravel()], 1), axis=0)  # by instance id, then class
        return [
            MaskObject(int(c), 0, (semantic == c) & (instance == k)) for k, c in pairs.tolist() if k != 0 and c != 0
        ]
    if encoding == "coco_panoptic":
        if array.ndim != 3 or array.shape[2] < 3:
            raise DataError(f"{where}: coco_panoptic needs an RGB PNG, got shape {array.shape}")
        if segments_info is None:
            raise DataError(f"{where}: coco_panoptic needs the image's segments_info (from the panoptic JSON)")
        ids = array[..., 0] + 256 * array[..., 1] + 256 * 256 * array[..., 2]
        if isinstance(segments_info, Mapping):  # a `Sequence({...})` column reads back as a dict of lists
            segments_info = [dict(zip(segments_info, values)) for values in zip(*segments_info.values())]
        objects = []
        for segment in sorted(segments_info, key=lambda s: int(s["id"])):
            mask = ids == int(segment["id"])
            if not mask.any():
                raise DataError(f"{where}: segment {segment['id']} of segments_info has no pixel in the PNG")
            objects.append(MaskObject(int(segment["category_id"]), int(segment.get("iscrowd", 0) or 0), mask))
        return objects
    if array.ndim == 3:  # a single-channel encoding saved as RGB: fine when the channels agree
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(3, array.shape[2]))):
            raise DataError(
                f"{where}: {encoding} needs a single-channel PNG of ids (got {array.shape[2]} differing channels: "
                "the transformers-example layout is mask_encoding: semantic_instance_channels)"
            )
        array = array[..., 0]
    values = [int(v) for v in np.unique(array) if v != 0]
    if encoding == "cityscapes":
        # Classes outside the class table (road, sky, ...) are dropped by `encode_objects`.
        return [MaskObject(v // 1000 if v >= 1000 else v, int(v < 1000), array == v) for v in values]
    if encoding == "instance_ids":
        # A dict (from JSON: string keys; from a datasets struct: absent keys as None) or [[id, class], ...].
        pairs = instance_classes.items() if isinstance(instance_classes, Mapping) else (instance_classes or [])
        table = {int(k): int(v) for k, v in pairs if v is not None}
        objects = []
        for v in values:
            if v in table:
                objects.append(MaskObject(table[v], 0, array == v))
            elif single_class is not None and not table:
                objects.append(MaskObject(single_class, 0, array == v))
            else:
                raise DataError(
                    f"{where}: instance {v} has no class: give each image's {{instance id: class}} table (or one "
                    "class for the whole data set)"
                )
        return objects
    raise DataError(f"unknown mask encoding {encoding!r}: one of {MASK_ENCODINGS}")


@dataclass
class ConvertedObjects:
    """Objects of one image in gd_hf's record form, and what was dropped (reason -> count)."""

    categories: list[int] = field(default_factory=list)
    rle_counts: list[str] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)  # (height, width)


def encode_objects(
    objects: list[MaskObject], classes: Categories, where: str, drop_unknown_classes: bool
) -> ConvertedObjects:
    """MaskObjects -> contiguous classes and compressed RLE. A class outside the table is an error naming it, or,
    for encodings whose masks hold classes that are not instance classes (cityscapes, panoptic stuff), dropped
    and counted."""
    out = ConvertedObjects()
    for obj in objects:
        out.size = obj.mask.shape
        category = classes.contiguous_id(obj.class_id)
        if category is None:
            if drop_unknown_classes:
                reason = f"class {obj.class_id} not in the class list"
                out.dropped[reason] = out.dropped.get(reason, 0) + 1
                continue
            raise DataError(
                f"{where}: class {obj.class_id} is not in the class list {dict(zip(classes.ids, classes.names))}"
                ": add it (data.category_names / the class file) or fix the mask"
            )
        rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
        out.categories.append(category)
        out.rle_counts.append(rle["counts"].decode())
        out.iscrowd.append(obj.iscrowd)
    return out


# Encodings whose masks legitimately hold classes that are not objects (dropped, counted, no error).
DROPS_OTHER_CLASSES = {"cityscapes", "coco_panoptic"}
