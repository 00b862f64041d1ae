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
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from gd_hf.data.masks import convert_segmentations

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


def _integer(value: Any) -> int | None:
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
        image_id, file_name = _integer(record["id"]), record["file_name"]
        width, height = _integer(record["width"]), _integer(record["height"])
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
        if not isinstance(category, dict) or _integer(category.get("id")) is None:
            raise DataError(
                f"{annotation_file}: `categories`[{index}] is {str(category)[:200]}: each category needs an integer "
                "`id` (and a `name`)"
            )
    return sorted(({**c, "id": _integer(c["id"])} for c in records), key=lambda c: c["id"])


def _crowd_flag(record: dict[str, Any], where: str) -> int:
    value = record.get("iscrowd", 0)
    if value is None:
        return 0
    if value not in (0, 1) or isinstance(value, float) and not value.is_integer():
        raise DataError(f"{where} has iscrowd {value!r}: it must be 0 or 1 (or absent)")
    return int(value)


def load_coco(
    annotation_file: str | Path, image_dir: str | Path, check_images: bool = True, crowd_as_objects: bool = False
) -> CocoSource:
    """Read and validate a COCO instances JSON; raise `DataError` naming the file and record on bad input.
    `crowd_as_objects`: `iscrowd: 1` annotations become objects (CVAT exports its mask instances so)."""
    with _gc_paused():
        return _load_coco(Path(annotation_file), Path(image_dir), check_images, crowd_as_objects)


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


def _load_coco(annotation_file: Path, image_dir: Path, check_images: bool, crowd_as_objects: bool) -> CocoSource:
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

    annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    skip_reasons: dict[str, int] = {}
    kept: list[tuple[int, int, int]] = []  # (image id, contiguous class, iscrowd) of each annotation to convert
    geometry: list[tuple[Any, int, int]] = []  # (segmentation, height, width), converted below in bulk
    for index, record in enumerate(coco["annotations"]):
        if not isinstance(record, dict):
            raise DataError(
                f"{annotation_file}: `annotations`[{index}] is a {type(record).__name__}, not an object: "
                f"{str(record)[:200]}"
            )
        ann_id = record.get("id", "?")
        image_id = _integer(record.get("image_id"))
        if image_id not in images:
            raise DataError(
                f"{annotation_file}: annotation {ann_id!r} points at image id {record.get('image_id')!r}, which is "
                "not in `images`"
            )
        category_id = _integer(record.get("category_id"))
        if category_id not in coco_to_contiguous:
            raise DataError(
                f"{annotation_file}: annotation {ann_id!r} (image {image_id}) has category_id "
                f"{record.get('category_id')!r}, which is not in `categories` (known: {sorted(coco_to_contiguous)})"
            )
        info = images[image_id]
        crowd = _crowd_flag(record, f"{annotation_file}: annotation {ann_id!r} (image {image_id})")
        crowd = 0 if crowd_as_objects else crowd
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
