"""Object masks as gd_hf stores them: every COCO segmentation (polygons, uncompressed RLE, compressed RLE) becomes
compressed RLE counts at load time (in worker processes for COCO-sized files), each checked first (pycocotools
checks none of it); and the counts decoded back to boolean masks."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from typing import Any

import numpy as np
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
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return "uncompressed RLE counts must be non-negative integers"
    if sum(counts) != height * width:
        return f"RLE counts cover {sum(counts)} pixels but the image has {height}x{width} = {height * width}"
    return None


def _polygon_problem(polygon: list, height: int, width: int) -> str | None:
    """Coordinates that are not numbers, or lie far outside the image: pycocotools rasterises a polygon along
    its whole outline, so coordinates of ~1e7 take GBs (and ~1e12 crash it)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon):
        return "polygon coordinates must be finite numbers"
    xs, ys = polygon[0::2], polygon[1::2]
    if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
        return f"polygon coordinates far outside the {width}x{height} image (x {min(xs):g}..{max(xs):g}, y {min(ys):g}..{max(ys):g})"
    return None


def rle_from_segmentation(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Polygons / uncompressed RLE / compressed RLE -> compressed RLE with `counts` as str; a `ValueError` says
    why a segmentation is unusable."""
    if segmentation is None or segmentation == []:
        raise ValueError("no segmentation (a bbox alone is not a mask)")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with at least 3 points")
        for polygon in polygons:
            problem = _polygon_problem(polygon, height, width)
            if problem:
                raise ValueError(problem)
        pieces = mask_utils.frPyObjects(polygons, height, width)
        rle = pieces[0] if len(pieces) == 1 else mask_utils.merge(pieces)  # most objects are one polygon
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
