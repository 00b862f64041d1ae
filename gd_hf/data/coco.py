"""COCO-format folders (image folder + instances JSON) read into HF `datasets`.

Every segmentation (polygons, uncompressed RLE, compressed RLE) is normalised to compressed RLE at load time,
so the rest of the code sees one format. Categories are mapped to contiguous ids 0..C-1 in ascending COCO id
order; the COCO ids are kept for writing COCO-JSON results.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable
from pycocotools import mask as mask_utils

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data is missing or malformed; the message names the file and record and what to do."""


@dataclass
class CocoSource:
    """A parsed COCO instances file, validated against its image folder."""

    annotation_file: Path
    image_dir: Path
    images: dict[int, dict[str, Any]]  # image id -> {"file_name", "width", "height"}
    annotations: dict[int, list[dict[str, Any]]]  # image id -> its annotations (normalised: RLE, contiguous class)
    category_ids: list[int]  # contiguous id -> COCO category id
    category_names: list[str]
    skipped_annotations: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.category_names))

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]


def _rle_from_segmentation(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons / uncompressed RLE / compressed RLE -> compressed RLE with `counts` as str."""
    if segmentation is None or segmentation == []:
        raise ValueError("no segmentation (a bbox alone is not a mask)")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        pieces = mask_utils.frPyObjects(polygons, height, width)
        rle = pieces[0] if len(pieces) == 1 else mask_utils.merge(pieces)  # most objects are one polygon
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image size {[height, width]}")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError("segmentation is neither a polygon list nor an RLE dict")
    if mask_utils.area(rle) == 0:
        raise ValueError("empty mask (zero area)")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode() if isinstance(counts, bytes) else counts}


# Polygon -> RLE conversion runs in worker processes above this many annotations (COCO train2017: ~860k,
# about 35 us each in pycocotools, plus the JSON parse: the bulk of a first launch's start-up).
PARALLEL_CONVERSION_MIN = 20_000
_GEOMETRY: list[tuple[Any, int, int]] = []  # what forked conversion workers read (inherited, never pickled)


def _convert_range(bounds: tuple[int, int]) -> list[str | ValueError]:
    results: list[str | ValueError] = []
    for segmentation, height, width in _GEOMETRY[bounds[0] : bounds[1]]:
        try:
            results.append(_rle_from_segmentation(segmentation, height, width)["counts"])
        except ValueError as e:
            results.append(ValueError(str(e)))
    return results


def convert_segmentations(geometry: list[tuple[Any, int, int]]) -> list[str | ValueError]:
    """The compressed RLE counts (`_rle_from_segmentation`) of each (segmentation, height, width), or the
    ValueError saying why it is unusable; spread over forked worker processes (up to 8, one per core) when there
    are many. Only the counts strings cross back from a worker: they pickle ~3x faster than the RLE dicts."""
    global _GEOMETRY
    workers = min(8, os.cpu_count() or 1)
    if len(geometry) < PARALLEL_CONVERSION_MIN or workers < 2 or "fork" not in mp.get_all_start_methods():
        _GEOMETRY = geometry
        try:
            return _convert_range((0, len(geometry)))
        finally:
            _GEOMETRY = []
    chunk = math.ceil(len(geometry) / (workers * 4))
    bounds = [(start, min(start + chunk, len(geometry))) for start in range(0, len(geometry), chunk)]
    _GEOMETRY = geometry  # set before the fork: the workers inherit it
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            return [converted for part in pool.map(_convert_range, bounds) for converted in part]
    finally:
        _GEOMETRY = []


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic GC off while millions of containers are made: a COCO train2017 parse spends more than half
    its time in collections that find nothing (measured: json 26 s -> 11 s; orjson 18 s -> 5 s)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_json(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        import orjson  # ~2x faster than json on COCO-sized files; optional
    except ImportError:
        return json.loads(raw)
    return orjson.loads(raw)


class _ImageFiles:
    """`exists(file_name)` for many files of one folder: one directory listing per sub-folder instead of a
    stat per image (118k stats on a network disk take minutes)."""

    def __init__(self, image_dir: Path):
        self.image_dir = image_dir
        self.listings: dict[str, set[str]] = {}

    def exists(self, file_name: str) -> bool:
        parent, _, name = file_name.replace(os.sep, "/").rpartition("/")
        if parent not in self.listings:
            try:
                self.listings[parent] = {e.name for e in os.scandir(self.image_dir / parent) if not e.is_dir()}
            except OSError:
                self.listings[parent] = set()
        return name in self.listings[parent] or (self.image_dir / file_name).is_file()


def _image_records(
    records: list[dict[str, Any]], annotation_file: Path, image_dir: Path, check_images: bool
) -> dict[int, dict[str, Any]]:
    """Image id -> file name and size, checked (ids unique, fields present, files there)."""
    images: dict[int, dict[str, Any]] = {}
    image_files = _ImageFiles(image_dir)
    for record in records:
        try:
            image_id, file_name = record["id"], record["file_name"]
            width, height = int(record["width"]), int(record["height"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{annotation_file}: image record {record} lacks id/file_name/width/height ({e})") from e
        if image_id in images:
            raise DataError(f"{annotation_file}: image id {image_id} appears twice ({file_name})")
        images[image_id] = {"file_name": file_name, "width": width, "height": height}
        if check_images and not image_files.exists(file_name):
            raise DataError(
                f"image {image_dir / file_name} (image id {image_id} in {annotation_file}) does not exist: "
                "restore the file or remove the image and its annotations from the JSON"
            )
    return images


def load_coco(
    annotation_file: str | Path, image_dir: str | Path, check_images: bool = True, crowd_as_objects: bool = False
) -> CocoSource:
    """Read and validate a COCO instances JSON; raise `DataError` naming the file and record on bad input.
    `crowd_as_objects`: `iscrowd: 1` annotations become objects (CVAT exports its mask instances so)."""
    with _gc_paused():
        return _load_coco(Path(annotation_file), Path(image_dir), check_images, crowd_as_objects)


def _load_coco(annotation_file: Path, image_dir: Path, check_images: bool, crowd_as_objects: bool) -> CocoSource:
    if not annotation_file.is_file():
        raise DataError(f"annotation file {annotation_file} does not exist: check data.*_annotations in the recipe")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist: check data.*_images in the recipe")
    try:
        coco = _parse_json(annotation_file)
    except (ValueError, UnicodeDecodeError) as e:  # json's and orjson's decode errors are ValueErrors
        raise DataError(f"{annotation_file} is not valid JSON: {e}") from e
    if not isinstance(coco, dict):
        raise DataError(f"{annotation_file} is not a JSON object: is it a COCO *instances* file?")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{annotation_file} has no `{key}` list: is it a COCO *instances* file?")
    if not coco["categories"]:
        raise DataError(f"{annotation_file} lists no categories")

    categories = sorted(coco["categories"], key=lambda c: c["id"])
    coco_to_contiguous = {c["id"]: i for i, c in enumerate(categories)}
    if len(coco_to_contiguous) < len(categories):  # the annotations of such an id could mean either class
        twice = sorted({c["id"] for c in categories if sum(d["id"] == c["id"] for d in categories) > 1})
        named = [f"{c.get('name')!r} (id {c['id']})" for c in categories if c["id"] in twice]
        raise DataError(f"{annotation_file}: category ids {twice} appear more than once in `categories`: {named}")

    images = _image_records(coco["images"], annotation_file, image_dir, check_images)

    annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    skip_reasons: dict[str, int] = {}
    kept: list[tuple[int, int, int]] = []  # (image id, contiguous class, iscrowd) of each annotation to convert
    geometry: list[tuple[Any, int, int]] = []  # (segmentation, height, width), converted below in bulk
    for record in coco["annotations"]:
        ann_id = record.get("id", "?")
        image_id = record.get("image_id")
        if image_id not in images:
            raise DataError(
                f"{annotation_file}: annotation {ann_id} points at image id {image_id}, which is not in `images`"
            )
        category_id = record.get("category_id")
        if category_id not in coco_to_contiguous:
            raise DataError(
                f"{annotation_file}: annotation {ann_id} (image {image_id}) has category_id {category_id}, "
                f"which is not in `categories` (known: {sorted(coco_to_contiguous)})"
            )
        info = images[image_id]
        crowd = 0 if crowd_as_objects else int(record.get("iscrowd", 0) or 0)
        kept.append((image_id, coco_to_contiguous[category_id], crowd))
        geometry.append((record.get("segmentation"), info["height"], info["width"]))
    del coco  # the raw JSON: only `geometry` is still needed
    for (image_id, category, crowd), converted in zip(kept, convert_segmentations(geometry)):
        if isinstance(converted, ValueError):
            # Unusable geometry is skipped (and counted), not fatal: COCO itself has a few such records.
            reason = str(converted)
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
            continue
        info = images[image_id]
        rle = {"size": [info["height"], info["width"]], "counts": converted}
        annotations[image_id].append({"rle": rle, "category": category, "iscrowd": crowd})
    skipped = sum(skip_reasons.values())
    if skipped:
        logger.warning(
            "%s: skipped %d annotations without usable segmentation: %s", annotation_file, skipped, skip_reasons
        )
    return CocoSource(
        annotation_file=annotation_file,
        image_dir=image_dir,
        images=images,
        annotations=annotations,
        category_ids=[c["id"] for c in categories],
        category_names=[str(c.get("name", c["id"])) for c in categories],
        skipped_annotations=skipped,
        skip_reasons=skip_reasons,
    )


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence(
            {
                "category": datasets.Value("int32"),
                "rle_counts": datasets.Value("string"),
                "iscrowd": datasets.Value("int8"),
            }
        ),
    }
)


# FEATURES with the image as its path only: `save_to_disk` copies the files of an `Image` column into the
# folder (all of COCO's images for a cache); a string column keeps the path, cast back to `Image` when read.
PATH_FEATURES = datasets.Features({**FEATURES, "image": datasets.Value("string")})


def to_hf_dataset(
    source: CocoSource,
    image_ids: list[int] | None = None,
    with_labels: bool = True,
    features: datasets.Features = FEATURES,
) -> datasets.Dataset:
    """The images `image_ids` (default: all) as a `datasets.Dataset`; `with_labels=False` drops the objects.
    `features`: FEATURES, or PATH_FEATURES (image paths as plain strings, e.g. for a cache on disk)."""
    ids = sorted(source.images) if image_ids is None else list(image_ids)
    # Arrow columns built directly (Dataset.from_dict would encode 118k nested rows in Python: 8 s for COCO).
    paths = [str(source.image_path(image_id)) for image_id in ids]
    offsets, categories, counts, crowds = [0], [], [], []
    for image_id in ids:
        anns = source.annotations[image_id] if with_labels else ()
        for a in anns:
            categories.append(a["category"])
            counts.append(a["rle"]["counts"])
            crowds.append(a["iscrowd"])
        offsets.append(len(categories))
    list_offsets = pa.array(offsets, pa.int32())
    objects = pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(list_offsets, pa.array(categories, pa.int32())),
            pa.ListArray.from_arrays(list_offsets, pa.array(counts, pa.string())),
            pa.ListArray.from_arrays(list_offsets, pa.array(crowds, pa.int8())),
        ],
        names=["category", "rle_counts", "iscrowd"],
    )
    if isinstance(features["image"], datasets.Image):
        image = pa.StructArray.from_arrays(
            [pa.nulls(len(ids), pa.binary()), pa.array(paths, pa.string())], ["bytes", "path"]
        )
    else:
        image = pa.array(paths, pa.string())
    columns = [
        image,
        pa.array(ids, pa.int64()),
        pa.array([source.images[i]["width"] for i in ids], pa.int32()),
        pa.array([source.images[i]["height"] for i in ids], pa.int32()),
        objects,
    ]
    table = pa.Table.from_arrays(columns, schema=features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def decode_masks(rle_counts: list[str], height: int, width: int) -> np.ndarray:
    """Compressed RLE strings -> bool array (N, H, W)."""
    if not rle_counts:
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": [height, width], "counts": c.encode()} for c in rle_counts]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
