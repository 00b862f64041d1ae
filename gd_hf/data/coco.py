"""COCO-format folders (image folder + instances JSON) read into HF `datasets`.

Every segmentation (polygons, uncompressed RLE, compressed RLE) is checked at load time and normalised to
compressed RLE, so the rest of the code sees one format; a training file's polygons may instead be kept as
parsed (`rasterise_polygons=False`) and rasterised when a record is read (see `gd_hf.data.masks`). Categories are
mapped to contiguous ids 0..C-1 in ascending COCO id order; the COCO ids are kept for writing COCO-JSON results.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

from gd_hf.data.masks import check_polygons, convert_segmentations

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data is missing or malformed; the message names the file and record and what to do."""


NO_POLYGONS = pa.array([[]], pa.list_(pa.list_(pa.float64())))  # one object's empty polygon list


@dataclass
class CocoObjects:
    """The usable annotations of a COCO file, in file order, as columns."""

    image_id: np.ndarray  # int64
    category: np.ndarray  # int32, contiguous class
    iscrowd: np.ndarray  # int8
    rle_counts: list[str]  # compressed RLE counts, or "" where `polygons` holds the object
    polygons: pa.ListArray  # list<list<float64>> per object: polygons to rasterise when read ([] for RLE)


@dataclass
class CocoSource:
    """A parsed COCO instances file, validated against its image folder."""

    annotation_file: Path
    image_dir: Path
    images: dict[int, dict[str, Any]]  # image id -> {"file_name", "width", "height"}
    objects: CocoObjects
    category_ids: list[int]  # contiguous id -> COCO category id
    category_names: list[str]
    skipped_annotations: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.category_names))

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    @cached_property
    def annotations(self) -> dict[int, list[dict[str, Any]]]:
        """Image id -> its annotations, each {"category", "iscrowd"} and "rle" (compressed) or "polygons"."""
        objects = self.objects
        has_polygons = pc.sum(pc.list_value_length(objects.polygons)).as_py()
        polygons = objects.polygons.to_pylist() if has_polygons else None
        annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in self.images}
        for k, image_id in enumerate(objects.image_id.tolist()):
            info = self.images[image_id]
            ann: dict[str, Any] = {"category": int(objects.category[k]), "iscrowd": int(objects.iscrowd[k])}
            if objects.rle_counts[k]:
                ann["rle"] = {"size": [info["height"], info["width"]], "counts": objects.rle_counts[k]}
            else:
                ann["polygons"] = polygons[k] if polygons is not None else []
            annotations[image_id].append(ann)
        return annotations


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
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # NaN / Infinity (Python's json writes them; strict JSON has none): json reads them, and the record
        # checks make such a coordinate an unusable segmentation (skipped and counted), not a file that stops.
        return json.loads(raw)


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


# The largest image a record may state: PIL's own hard limit (2x its decompression-bomb warning size). Masks are
# decoded at the stated size, so a record claiming 1e5 x 1e5 would take 10 GB per object.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def integer_id(value: Any) -> int | None:
    """`value` as an int if it is one (JSON writers sometimes give 640.0), else None; booleans are not ints."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:  # ids are stored as int64
        return value
    return None


def _image_records(
    records: list[dict[str, Any]], annotation_file: Path, image_dir: Path, check_images: bool
) -> dict[int, dict[str, Any]]:
    """Image id -> file name and size, checked (ids unique integers, sizes positive, files there)."""
    images: dict[int, dict[str, Any]] = {}
    image_files = _ImageFiles(image_dir)
    for index, record in enumerate(records):
        where = f"{annotation_file}: `images`[{index}]"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a {type(record).__name__}, not an object: {str(record)[:200]}")
        missing = [key for key in ("id", "file_name", "width", "height") if key not in record]
        if missing:
            raise DataError(f"{where} lacks {missing}: {str(record)[:200]}")
        image_id, file_name = integer_id(record["id"]), record["file_name"]
        width, height = integer_id(record["width"]), integer_id(record["height"])
        if image_id is None:
            raise DataError(f"{where} has id {record['id']!r}: COCO image ids are integers")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{where} (image id {image_id}) has file_name {file_name!r}: a relative path is needed")
        if width is None or height is None or width <= 0 or height <= 0:
            raise DataError(
                f"{where} (image id {image_id}) has width {record['width']!r} and height {record['height']!r}: "
                "both must be positive integers (the image's size in pixels)"
            )
        if width * height > MAX_IMAGE_PIXELS:
            raise DataError(
                f"{where} (image id {image_id}) states {width}x{height} pixels, more than any image gd_hf reads "
                f"({MAX_IMAGE_PIXELS}): fix width/height"
            )
        if image_id in images:
            raise DataError(f"{annotation_file}: image id {image_id} appears twice ({file_name})")
        images[image_id] = {"file_name": file_name, "width": width, "height": height}
        if check_images and not image_files.exists(file_name):
            raise DataError(
                f"image {image_dir / file_name} (image id {image_id} in {annotation_file}) does not exist: "
                "restore the file or remove the image and its annotations from the JSON"
            )
    return images


def _categories(records: list[Any], annotation_file: Path) -> list[dict[str, Any]]:
    """The `categories` list, checked (objects with integer ids) and sorted by id."""
    for index, category in enumerate(records):
        if not isinstance(category, dict) or integer_id(category.get("id")) is None:
            raise DataError(
                f"{annotation_file}: `categories`[{index}] is {str(category)[:200]}: each category needs an integer "
                "`id` (and a `name`)"
            )
    return sorted(({**c, "id": integer_id(c["id"])} for c in records), key=lambda c: c["id"])


def crowd_flag(record: dict[str, Any], where: str) -> int:
    """A record's iscrowd as 0 or 1 (absent or null: 0); anything else a DataError naming `where`."""
    value = record.get("iscrowd", 0)
    if value is None:
        return 0
    if value not in (0, 1) or isinstance(value, float) and not value.is_integer():
        raise DataError(f"{where} has iscrowd {value!r}: it must be 0 or 1 (or absent)")
    return int(value)


def load_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    check_images: bool = True,
    crowd_as_objects: bool = False,
    rasterise_polygons: bool = True,
) -> CocoSource:
    """Read and validate a COCO instances JSON; raise `DataError` naming the file and record on bad input.
    `crowd_as_objects`: `iscrowd: 1` annotations become objects (CVAT exports its mask instances so).
    `rasterise_polygons=False`: polygons are checked but kept as parsed, to be rasterised when a record is read
    (a training file: most of its images may never be read with their labels)."""
    with _gc_paused():
        return _load_coco(Path(annotation_file), Path(image_dir), check_images, crowd_as_objects, rasterise_polygons)


def _read_instances_json(annotation_file: Path) -> dict[str, Any]:
    """The parsed JSON, checked to be a COCO instances file with images and categories."""
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
    if not coco["images"]:
        raise DataError(f"{annotation_file} lists no images")
    return coco


def _load_coco(
    annotation_file: Path, image_dir: Path, check_images: bool, crowd_as_objects: bool, rasterise_polygons: bool
) -> CocoSource:
    if not annotation_file.is_file():
        raise DataError(f"annotation file {annotation_file} does not exist: check data.*_annotations in the recipe")
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist: check data.*_images in the recipe")
    coco = _read_instances_json(annotation_file)
    categories = _categories(coco["categories"], annotation_file)
    coco_to_contiguous = {c["id"]: i for i, c in enumerate(categories)}
    if len(coco_to_contiguous) < len(categories):  # the annotations of such an id could mean either class
        twice = sorted({c["id"] for c in categories if sum(d["id"] == c["id"] for d in categories) > 1})
        named = [f"{c.get('name')!r} (id {c['id']})" for c in categories if c["id"] in twice]
        raise DataError(f"{annotation_file}: category ids {twice} appear more than once in `categories`: {named}")

    images = _image_records(coco["images"], annotation_file, image_dir, check_images)

    image_ids: list[int] = []
    classes: list[int] = []
    crowds: list[int] = []
    segmentations: list[Any] = []
    for index, record in enumerate(coco["annotations"]):
        if not isinstance(record, dict):
            raise DataError(
                f"{annotation_file}: `annotations`[{index}] is a {type(record).__name__}, not an object: "
                f"{str(record)[:200]}"
            )
        ann_id = record.get("id", "?")
        # (the type test first: integer_id's call is a third of this loop's time on COCO's 860k records; an int
        # beyond int64 is in neither dict below)
        image_id = record.get("image_id")
        image_id = image_id if type(image_id) is int else integer_id(image_id)
        if image_id not in images:
            raise DataError(
                f"{annotation_file}: annotation {ann_id!r} points at image id {record.get('image_id')!r}, which is "
                "not in `images`"
            )
        category_id = record.get("category_id")
        category_id = category_id if type(category_id) is int else integer_id(category_id)
        if category_id not in coco_to_contiguous:
            raise DataError(
                f"{annotation_file}: annotation {ann_id!r} (image {image_id}) has category_id "
                f"{record.get('category_id')!r}, which is not in `categories` (known: {sorted(coco_to_contiguous)})"
            )
        crowd = crowd_flag(record, f"{annotation_file}: annotation {ann_id!r} (image {image_id})")
        image_ids.append(image_id)
        classes.append(coco_to_contiguous[category_id])
        crowds.append(0 if crowd_as_objects else crowd)
        segmentations.append(record.get("segmentation"))
    del coco  # the raw JSON: only `segmentations` is still needed
    rle_counts, polygons, problems = _checked_geometry(segmentations, image_ids, images, rasterise_polygons)
    skip_reasons: dict[str, int] = {}
    for problem in problems:  # unusable geometry is skipped (and counted), not fatal: COCO itself has a few
        if problem is not None:
            skip_reasons[problem] = skip_reasons.get(problem, 0) + 1
    kept = np.flatnonzero(np.array([p is None for p in problems], bool))
    objects = CocoObjects(
        image_id=np.asarray(image_ids, np.int64)[kept],
        category=np.asarray(classes, np.int32)[kept],
        iscrowd=np.asarray(crowds, np.int8)[kept],
        rle_counts=[rle_counts[k] for k in kept.tolist()],
        polygons=polygons if len(kept) == len(problems) else polygons.take(pa.array(kept)),
    )
    skipped = sum(skip_reasons.values())
    if skipped:
        logger.warning(
            "%s: skipped %d annotations without usable segmentation: %s", annotation_file, skipped, skip_reasons
        )
    return CocoSource(
        annotation_file=annotation_file,
        image_dir=image_dir,
        images=images,
        objects=objects,
        category_ids=[c["id"] for c in categories],
        category_names=[str(c.get("name", c["id"])) for c in categories],
        skipped_annotations=skipped,
        skip_reasons=skip_reasons,
    )


def _checked_geometry(
    segmentations: list[Any], image_ids: list[int], images: dict[int, dict[str, Any]], rasterise_polygons: bool
) -> tuple[list[str], pa.ListArray, list[str | None]]:
    """Each segmentation's compressed RLE counts ("" for polygons kept as parsed), its polygons (list<list<float64>>
    per annotation, [] unless kept) and its problem (None where usable)."""
    heights = np.array([images[i]["height"] for i in image_ids], np.int64)
    widths = np.array([images[i]["width"] for i in image_ids], np.int64)
    lazily = [not rasterise_polygons and isinstance(s, list) and s != [] for s in segmentations]
    eager = [k for k, kept_as_parsed in enumerate(lazily) if not kept_as_parsed]
    converted = convert_segmentations([(segmentations[k], int(heights[k]), int(widths[k])) for k in eager])
    polygons, problems = check_polygons(
        [s if kept_as_parsed else None for s, kept_as_parsed in zip(segmentations, lazily)], heights, widths
    )
    rle_counts = [""] * len(segmentations)
    for k, result in zip(eager, converted):
        if isinstance(result, ValueError):
            problems[k] = str(result)
        else:
            rle_counts[k] = result
    return rle_counts, polygons, problems


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
                # A COCO training file's polygons, rasterised when the record is read; [] where rle_counts holds
                # the mask (everywhere else).
                "polygons": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
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
    if len(set(ids)) < len(ids):
        raise ValueError(
            f"to_hf_dataset: image ids asked for more than once: {sorted({i for i in ids if ids.count(i) > 1})[:10]}"
        )
    # Arrow columns built directly (Dataset.from_dict would encode 118k nested rows in Python: 8 s for COCO), the
    # objects put in row order with numpy (a Python loop over COCO's 860k objects took 5 s).
    paths = [str(source.image_path(image_id)) for image_id in ids]
    objects = source.objects
    rows = np.full(len(objects.image_id), -1, np.int64)  # each object's row, -1 where its image is not asked for
    if with_labels and ids and len(rows):
        asked = np.asarray(ids, np.int64)
        by_id = np.argsort(asked, kind="stable")
        position = np.minimum(np.searchsorted(asked[by_id], objects.image_id), len(ids) - 1)
        rows = np.where(asked[by_id][position] == objects.image_id, by_id[position], -1)
    selected = np.flatnonzero(rows >= 0)
    order = selected[np.argsort(rows[selected], kind="stable")]  # by row, file order within a row
    per_row = np.bincount(rows[selected], minlength=len(ids))
    list_offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]), pa.int32())
    in_order = len(order) == len(rows) and bool((order == np.arange(len(rows))).all())  # (most files: no copy)
    take = None if in_order else pa.array(order, pa.int64())
    rle_counts, polygons = pa.array(objects.rle_counts, pa.string()), objects.polygons
    if take is not None:
        rle_counts, polygons = rle_counts.take(take), polygons.take(take)
    objects_array = pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(list_offsets, pa.array(objects.category[order], pa.int32())),
            pa.ListArray.from_arrays(list_offsets, rle_counts),
            pa.ListArray.from_arrays(list_offsets, pa.array(objects.iscrowd[order], pa.int8())),
            pa.ListArray.from_arrays(list_offsets, polygons),
        ],
        names=["category", "rle_counts", "iscrowd", "polygons"],
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
        objects_array,
    ]
    table = pa.Table.from_arrays(columns, schema=features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))
