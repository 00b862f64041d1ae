"""Object masks as gd_hf stores them: compressed RLE counts, or the polygons of a COCO training file, kept as parsed
and rasterised when a record is read (converting COCO train2017's ~860k polygons took most of a first launch's
start-up, and a 1 % labeled split reads 1 % of them). Every segmentation is checked when it is parsed
(pycocotools checks none of it): polygons in bulk with numpy (`check_polygons`), RLE one by one; `object_masks`
decodes either kind back to boolean masks."""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
from typing import Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils


def compressed_rle_problem(counts: str | bytes, height: int, width: int) -> str | None:
    """Why a compressed RLE string cannot be an (height, width) mask, or None if it can.

    pycocotools checks none of this: counts that sum past h*w fail only when decoded (a `ValueError` mid-run),
    and counts that sum short of it decode to uninitialised memory without a word. This walks the string as
    pycocotools' `rleFrString` does (LEB128-like 5-bit groups, offset 48, each run after the second a delta
    of the run two back).
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return "compressed RLE counts hold non-ASCII characters"
    if not isinstance(counts, bytes):
        return f"RLE counts are a {type(counts).__name__}, not a string or a list of integers"
    runs: list[int] = []
    value = shift = 0
    for byte in counts:
        c = byte - 48
        if not 0 <= c < 64:
            return f"compressed RLE counts hold the character {chr(byte)!r}, which is not in its alphabet"
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return f"compressed RLE counts decode to a negative run ({value}) at run {len(runs)}"
        runs.append(value)
        value = shift = 0
    if shift:
        return "compressed RLE counts end in the middle of a number (the string is cut)"
    total = sum(runs)
    if total != height * width:
        return f"RLE counts cover {total} pixels but the image has {height}x{width} = {height * width}"
    return None


def _uncompressed_rle_problem(counts: list, height: int, width: int) -> str | None:
    if counts and (set(map(type, counts)) != {int} or min(counts) < 0):  # (a bool's type is not int; ~10x faster)
        return "uncompressed RLE counts must be non-negative integers"
    if sum(counts) != height * width:
        return f"RLE counts cover {sum(counts)} pixels but the image has {height}x{width} = {height * width}"
    return None


def _polygon_problem(polygon: list, height: int, width: int) -> str | None:
    """Coordinates that are not numbers, or lie far outside the image: pycocotools rasterises a polygon along
    its whole outline, so coordinates of ~1e7 take GBs (and ~1e12 crash it)."""
    try:
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon)
    except OverflowError:  # an integer beyond float64
        finite = False
    if not finite:
        return "polygon coordinates must be finite numbers"
    xs, ys = polygon[0::2], polygon[1::2]
    if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
        return f"polygon coordinates far outside the {width}x{height} image (x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g})"
    return None


def usable_polygons(segmentation: list) -> list:
    """The polygons of a COCO polygon segmentation that pycocotools can rasterise (3 points or more)."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6]


def polygons_problem(polygons: list, height: int, width: int) -> str | None:
    """Why an object's polygons (as records store them: each with 3 points or more) cannot be rasterised, or
    None."""
    if not isinstance(polygons, list) or not all(isinstance(p, list) and len(p) >= 6 for p in polygons):
        return "polygons must be lists of at least 3 points"
    return next((problem for p in polygons if (problem := _polygon_problem(p, height, width))), None)


def rle_from_polygons(polygons: list, height: int, width: int) -> dict[str, Any]:
    """Checked polygons -> one compressed RLE (pycocotools' rasterisation, the polygons merged)."""
    pieces = mask_utils.frPyObjects([list(p) for p in polygons], height, width)
    return pieces[0] if len(pieces) == 1 else mask_utils.merge(pieces)  # most objects are one polygon


def rle_from_segmentation(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons / uncompressed RLE / compressed RLE -> compressed RLE with `counts` as str; a `ValueError` says
    why a segmentation is unusable."""
    if segmentation is None or segmentation == []:
        raise ValueError("no segmentation (a bbox alone is not a mask)")
    if isinstance(segmentation, list):
        polygons = usable_polygons(segmentation)
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        for polygon in polygons:
            problem = _polygon_problem(polygon, height, width)
            if problem:
                raise ValueError(problem)
        rle = rle_from_polygons(polygons, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            problem = _uncompressed_rle_problem(counts, height, width)
            if problem:
                raise ValueError(problem)
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            problem = compressed_rle_problem(counts, height, width)
            if problem:
                raise ValueError(problem)
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
            results.append(rle_from_segmentation(segmentation, height, width)["counts"])
        except (ValueError, TypeError, OverflowError) as e:  # pycocotools' own errors on odd input included
            results.append(ValueError(str(e) if isinstance(e, ValueError) else f"unusable segmentation ({e})"))
    return results


def convert_segmentations(geometry: list[tuple[Any, int, int]]) -> list[str | ValueError]:
    """The compressed RLE counts (`rle_from_segmentation`) of each (segmentation, height, width), or the
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


# Polygons whose summed area (shoelace) is below this many pixels are rasterised at parse to learn whether they
# cover any pixel (a sliver or a self-crossing outline may cover none); larger ones are kept as parsed. One that
# still covers no pixel when read is dropped as an object cropped away is.
SMALL_POLYGON_AREA = 16.0


def check_polygons(
    segmentations: list[list], heights: np.ndarray, widths: np.ndarray
) -> tuple[pa.ListArray, list[str | None]]:
    """COCO polygon segmentations (lists of polygons) checked in bulk, as `rle_from_segmentation` checks them one
    by one, without rasterising them (~5 us per object instead of ~25 us): the usable polygons of each, as an
    Arrow list<list<float64>> per object ([] where unusable), and each one's problem or None. A segmentation
    given as None is not a polygon one (checked elsewhere): [] and no problem."""
    polygons = [usable_polygons(s) if s is not None else [] for s in segmentations]
    problems: list[str | None] = [
        None if p or s is None else "no polygon with at least 3 points" for p, s in zip(polygons, segmentations)
    ]
    flat, lengths, coordinates = _flatten(polygons)
    polygon_object = np.repeat(np.arange(len(polygons)), [len(p) for p in polygons])
    if coordinates is None:  # a coordinate that is not a number somewhere: the polygons checked one by one
        bad = [_polygon_problem(p, int(heights[k]), int(widths[k])) is not None for p, k in zip(flat, polygon_object)]
        bad_polygon = np.array(bad, bool)
    else:
        bad_polygon = _outside_or_not_finite(coordinates, lengths, heights[polygon_object], widths[polygon_object])
    for k in np.unique(polygon_object[bad_polygon]):
        problems[k] = next(
            problem for p in polygons[k] if (problem := _polygon_problem(p, int(heights[k]), int(widths[k])))
        )
    if bad_polygon.any() or coordinates is None:  # flattened again without them (a file with such records is rare;
        # None with none bad: numbers of a float subclass, e.g. numpy's, which the one-by-one check accepts)
        polygons = [p if problems[k] is None else [] for k, p in enumerate(polygons)]
        flat, lengths, coordinates = _flatten(polygons, checked=True)
        polygon_object = np.repeat(np.arange(len(polygons)), [len(p) for p in polygons])
    areas = np.bincount(polygon_object, weights=_shoelace_areas(coordinates, lengths), minlength=len(polygons))
    for k in np.flatnonzero(areas < SMALL_POLYGON_AREA):
        if (
            problems[k] is None
            and polygons[k]
            and mask_utils.area(rle_from_polygons(polygons[k], int(heights[k]), int(widths[k]))) == 0
        ):
            problems[k] = "empty mask (zero area)"
            polygons[k] = []
    counts = np.fromiter(map(len, polygons), np.int64, len(polygons))
    lengths = np.fromiter(map(len, itertools.chain.from_iterable(polygons)), np.int64, int(counts.sum()))
    coordinates = coordinates if len(coordinates) == lengths.sum() else _flatten(polygons, checked=True)[2]
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()), coordinates)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32()), inner), problems


def _flatten(polygons: list[list[list]], checked: bool = False) -> tuple[list[list], np.ndarray, np.ndarray | None]:
    """The polygons of all objects in one list, their lengths, and all coordinates as one float64 array (None
    when one is not an int or float: numpy would read True, "1.5" and None as numbers; `checked`: they passed
    `_polygon_problem`, so any number type is read)."""
    flat = list(itertools.chain.from_iterable(polygons))
    lengths = np.fromiter(map(len, flat), np.int64, len(flat))
    if not checked and not set(map(type, itertools.chain.from_iterable(flat))) <= {int, float}:
        return flat, lengths, None
    try:
        return flat, lengths, np.fromiter(itertools.chain.from_iterable(flat), np.float64, int(lengths.sum()))
    except OverflowError:  # an integer beyond float64
        return flat, lengths, None


def _points(coordinates: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x and y of each polygon's points (len // 2 of them, as pycocotools reads) and each polygon's first
    point; slices, without index arrays, when every polygon has an even length (COCO's do)."""
    points = lengths // 2
    first_point = np.concatenate([[0], np.cumsum(points)[:-1]]).astype(np.int64)
    if not (lengths % 2).any():
        return coordinates[0::2], coordinates[1::2], first_point
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    polygon = np.repeat(np.arange(len(lengths)), points)
    at = starts[polygon] + 2 * (np.arange(len(polygon)) - first_point[polygon])
    return coordinates[at], coordinates[at + 1], first_point


def _outside_or_not_finite(
    coordinates: np.ndarray, lengths: np.ndarray, heights: np.ndarray, widths: np.ndarray
) -> np.ndarray:
    """Per polygon: a coordinate not finite or beyond the bounds `_polygon_problem` sets (x in [-w, 2w], y in
    [-h, 2h]), from each polygon's extremes (NaN fails every comparison, so `not inside` catches it)."""
    if not len(lengths):
        return np.zeros(0, bool)
    xs, ys, first = _points(coordinates, lengths)
    bad = np.zeros(len(lengths), bool)
    for values, limit in ((xs, widths), (ys, heights)):
        low, high = np.minimum.reduceat(values, first), np.maximum.reduceat(values, first)
        with np.errstate(invalid="ignore"):
            bad |= ~((low >= -limit) & (high <= 2 * limit) & np.isfinite(low) & np.isfinite(high))
    odd = np.flatnonzero(lengths % 2)  # the trailing coordinate pycocotools ignores, checked as an x
    if len(odd):
        last = coordinates[np.cumsum(lengths)[odd] - 1]
        with np.errstate(invalid="ignore"):
            bad[odd] |= ~((last >= -widths[odd]) & (last <= 2 * widths[odd]) & np.isfinite(last))
    return bad


def _shoelace_areas(coordinates: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The area of each polygon (the points pycocotools reads: len // 2 of them), non-finite ones as 0."""
    if not len(lengths):
        return np.zeros(0)
    xs, ys, first = _points(coordinates, lengths)
    # cross product of each point with the next one, the last point's with its polygon's first
    following_x, following_y = np.empty_like(xs), np.empty_like(ys)
    following_x[:-1], following_y[:-1] = xs[1:], ys[1:]
    last = np.concatenate([first[1:], [len(xs)]]) - 1
    following_x[last], following_y[last] = xs[first], ys[first]
    with np.errstate(invalid="ignore", over="ignore"):
        areas = 0.5 * np.abs(np.add.reduceat(xs * following_y - following_x * ys, first))
    return np.nan_to_num(areas, nan=0.0, posinf=0.0)


def object_masks(rle_counts: list[str], polygons: list[list[list[float]]], height: int, width: int) -> np.ndarray:
    """The masks (N, H, W) bool of N objects, each given by its compressed RLE counts or, where those are empty,
    by its polygons (checked and rasterised here). A `ValueError` names the first bad one."""
    if not any(polygons):
        return decode_masks(rle_counts, height, width)
    if len(polygons) != len(rle_counts):
        raise ValueError(f"{len(rle_counts)} RLE counts but {len(polygons)} polygon lists")
    for index, (counts, shapes) in enumerate(zip(rle_counts, polygons)):
        if bool(counts) == bool(shapes):
            raise ValueError(f"object {index}: holds {'both' if shapes else 'neither'} RLE counts and polygons")
        # Checked again (~3 us each): records from shards or streams were not parsed by load_coco, and a NaN or
        # a coordinate of 1e8 makes pycocotools crash the process or take GBs.
        problem = polygons_problem(shapes, height, width)
        if problem:
            raise ValueError(f"object {index}: {problem}")
    masks = np.zeros((len(rle_counts), height, width), dtype=bool)
    rles = [i for i, counts in enumerate(rle_counts) if counts]
    if rles:
        masks[rles] = decode_masks([rle_counts[i] for i in rles], height, width)
    for i, shapes in enumerate(polygons):
        if shapes:
            masks[i] = mask_utils.decode(rle_from_polygons(shapes, height, width)).astype(bool)
    return masks


def decode_masks(rle_counts: list[str], height: int, width: int) -> np.ndarray:
    """Compressed RLE strings -> bool array (N, H, W); a `ValueError` names the first one that is not a valid
    (H, W) mask (records from shards, hub data sets or an old cache were not all checked at start)."""
    if not rle_counts:
        return np.zeros((0, height, width), dtype=bool)
    for index, counts in enumerate(rle_counts):
        problem = compressed_rle_problem(counts, height, width)
        if problem:
            raise ValueError(f"object {index}: {problem}")
    rles = [{"size": [height, width], "counts": c.encode()} for c in rle_counts]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
