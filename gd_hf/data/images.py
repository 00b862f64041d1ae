"""Reading the images of records: decoded as 8-bit RGB as training and evaluation see them (EXIF orientation,
16-bit scaling), and checked at start (every val image, cheaply) so that a broken file stops a run before its
first step, naming the file."""

from __future__ import annotations

import io
import os
import stat
import threading
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gd_hf.data.coco import DataError


def _open_image(example: dict[str, Any], draft: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """The example's image decoded (at 1/8 scale for a JPEG with `draft`: enough to find a broken file fast), and
    its stored size; a `DataError` naming the file and image id if it cannot be read."""
    cell = example["image"]
    if cell.get("bytes") is None and not _regular_file(cell["path"]):  # a FIFO would block the read for ever
        raise unreadable(example, OSError(f"{cell['path']} is not a regular file"))
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"])
        stored = image.size
        if draft:
            image.draft("RGB", (max(1, stored[0] // 8), max(1, stored[1] // 8)))
        image.load()
    except Exception as e:  # noqa: BLE001 - a decode error of any kind (PIL raises ValueError for a damaged PNG
        # chunk, for one) is a bad record: `data.on_error` decides, never a crash at that step on every relaunch
        raise unreadable(example, e) from e
    return image, stored


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # (missing or unreadable: the open says which, as before)


def unreadable(example: dict[str, Any], error: Exception) -> DataError:
    cell = example["image"]
    path = (cell.get("path") if isinstance(cell, dict) else None) or "<bytes>"
    why = (
        error
        if isinstance(error, (OSError, UnidentifiedImageError, SyntaxError))
        else f"{type(error).__name__}: {error}"
    )
    return DataError(
        f"cannot read image {path} (image id {example['image_id']}): {why}. Replace the file, or remove the image "
        "and its annotations from the JSON."
    )


def _size_mismatch(example: dict[str, Any], size: tuple[int, int]) -> DataError:
    path = example["image"].get("path") or "<bytes>"
    return DataError(
        f"image {path} (image id {example['image_id']}) is {size[0]}x{size[1]} but the annotation file "
        f"says {example['width']}x{example['height']}: fix width/height in the JSON"
    )


def read_image(example: dict[str, Any]) -> torch.Tensor:
    """Decode the example's image (an undecoded `datasets.Image` cell) as uint8 RGB (3, H, W).

    - grayscale, palette, RGBA (alpha dropped), CMYK: converted to RGB; 16-bit and 32-bit integer images are
      scaled to 8 bits (not clipped);
    - EXIF orientation: the image is turned as viewers show it when the record's width/height are the turned
      size (what annotation tools draw on), and left as stored when they are the stored size;
    - unreadable, truncated or too large (PIL's decompression-bomb limit) files raise a `DataError` naming the
      file and the image id; so does a size that matches neither way.
    """
    image, _ = _open_image(example)
    stated = (example["width"], example["height"])
    try:  # (a damaged EXIF block, or pixels that are not numbers, are bad records too)
        if image.getexif().get(0x0112, 1) not in (1, None):  # an EXIF orientation other than "as stored"
            turned = ImageOps.exif_transpose(image)
            if stated[0] <= 0 or (turned.width, turned.height) == stated:
                image = turned
        image = to_rgb(image)
    except Exception as e:  # noqa: BLE001 - as in _open_image
        raise unreadable(example, e) from e
    # width/height 0: a record without a stated size (plain image folders); any other mismatch is an error.
    if stated[0] > 0 and (image.width, image.height) != stated:
        raise _size_mismatch(example, image.size)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def check_image(example: dict[str, Any]) -> None:
    """Raise the `DataError` that `read_image` would raise for this example, at a fraction of its cost (a JPEG is
    decoded at 1/8 scale): for checking every val image at start."""
    image, stored = _open_image(example, draft=True)
    stated = (example["width"], example["height"])
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - as in _open_image
        raise unreadable(example, e) from e
    turned_sizes = {stored, stored[::-1]} if orientation in (5, 6, 7, 8) else {stored}
    if stated[0] > 0 and stated not in turned_sizes:
        raise _size_mismatch(example, stored)


def check_images(
    records: datasets.Dataset, what: str, rank: int = 0, world_size: int = 1, stop: threading.Event | None = None
) -> list[str]:
    """The problems of the images of `records` this process checks (every `world_size`-th from `rank`), read in
    threads (decoding releases the GIL), with a progress bar; once `stop` is set, the rest are not read."""
    import concurrent.futures
    import os

    from tqdm.auto import tqdm

    undecoded = records.cast_column("image", datasets.Image(decode=False)).select_columns(
        ["image", "image_id", "width", "height"]
    )
    rows = range(rank, len(undecoded), world_size)

    def problem(row: int) -> str | None:
        if stop is not None and stop.is_set():
            return None
        try:
            check_image(undecoded[row])
        except DataError as e:
            return str(e)
        return None

    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        found = tqdm(pool.map(problem, rows), total=len(rows), desc=f"checking {what} images", leave=False,
                     disable=rank != 0 or len(rows) < 200)  # fmt: skip
        return [p for p in found if p is not None]


def image_files_key(records: datasets.Dataset) -> str | None:
    """A digest of the image files `records` name (path, size, modification time), or None when an image is not a
    file (bytes in a data set): the key under which their check is remembered (`prepare_data`)."""
    import hashlib

    cells = records.cast_column("image", datasets.Image(decode=False))["image"]
    digest = hashlib.sha256()
    for cell in cells:
        path = cell.get("path") if isinstance(cell, dict) else None
        if not path or cell.get("bytes") is not None:
            return None
        try:
            stat = os.stat(path)
        except OSError:
            return None  # (the check names it)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, as training and evaluation see it (16/32-bit and float scaled, not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "I" and values.max() > 65535:
            top = float(2**31 - 1)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    if image.mode == "F":
        values = np.asarray(image)
        if not np.isfinite(values).all():  # NaN would become some byte, silently
            raise ValueError("a float image with non-finite pixels (NaN or infinity)")
        gray = np.clip(values / max(float(values.max()), 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1))
    return image if image.mode == "RGB" else image.convert("RGB")
