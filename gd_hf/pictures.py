"""Pictures of a run, pure drawing: instance overlays and grids of panels (the curves of `metrics.jsonl`:
`gd_hf.curves`).

Called at every evaluation, by `gd_hf.predict`, by the Space and by the model card, so everything here is fast,
deterministic and needs no display.
"""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from scipy import ndimage

if TYPE_CHECKING:
    pass

Color = tuple[int, int, int]
Series = dict[str, tuple[list[int], list[float]]]

BLACK_TEXT: Color = (0, 0, 0)
WHITE_TEXT: Color = (255, 255, 255)


# ---------------------------------------------------------------- overlays


def instance_colors(count: int) -> list[Color]:
    """Well-separated colours (golden-angle hues), the same for a given `count` every time."""
    return [
        tuple(int(c * 255) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)) for i in range(count)
    ]


def label_font_size(width: int, height: int) -> int:
    """Label font size in px for an image of this size: ~1/28 of its short side, never under 10 px (readable)."""
    return max(10, round(min(width, height) / 28))


def outline_width(width: int, height: int) -> int:
    """Mask outline width in px: 1 px at 64 px images, ~3 px at 1000 px."""
    return max(1, round(min(width, height) / 330))


@lru_cache(maxsize=64)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (cached: fonts are loaded once per size, not once per label)."""
    return ImageFont.load_default(size=size)


def text_color_on(color: Color) -> Color:
    """Black or white, whichever contrasts more with `color` (WCAG relative luminance)."""
    channels = [c / 255 for c in color]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    # contrast with black (L + 0.05) / 0.05 against contrast with white 1.05 / (L + 0.05)
    return BLACK_TEXT if (luminance + 0.05) ** 2 > 0.05 * 1.05 else WHITE_TEXT


def label_box_size(text: str, font_size: int) -> tuple[int, int]:
    """(width, height) of the filled box a label is drawn on: the text plus a margin of ~1/5 of the font size."""
    font = label_font(font_size)
    margin = label_margin(font_size)
    _, cap_top, _, descent = font.getbbox("Hg", anchor="ls")  # one height for every label: no jumping boxes
    return math.ceil(font.getlength(text)) + 2 * margin, descent - cap_top + 2 * margin


def label_margin(font_size: int) -> int:
    """Space between a label's text and the edge of its box, in px."""
    return max(2, font_size // 5)


def place_label(center: tuple[int, int], box_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int]:
    """Top-left (x, y) of a `box_size` (w, h) box centred at `center` (x, y), moved to lie fully inside an
    `image_size` (w, h) image (at its top-left when it is larger than the image)."""
    (cx, cy), (box_w, box_h), (width, height) = center, box_size, image_size
    x = min(max(cx - box_w // 2, 0), max(width - box_w, 0))
    y = min(max(cy - box_h // 2, 0), max(height - box_h, 0))
    return x, y


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of a (H, W) bool mask, bottom and right exclusive; None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel deep inside a non-empty (H, W) bool mask: of the pixels at least 80% as far from the
    boundary as the farthest one, the closest to the mask's centre. Inside the object even when its centre is
    not (a ring, a C shape), and central along a long one (a rectangle's ridge is a whole line)."""
    top, bottom, left, right = mask_bounds(mask)
    # a False border, so the bounding box's edge counts as the boundary; the crop keeps this cheap
    crop = np.pad(mask[top:bottom, left:right], 1)
    depth = ndimage.distance_transform_edt(crop)
    ys, xs = np.nonzero(depth >= 0.8 * depth.max())
    centre_y, centre_x = (coords.mean() for coords in np.nonzero(crop))
    nearest = np.argmin((ys - centre_y) ** 2 + (xs - centre_x) ** 2)
    return left + int(xs[nearest]) - 1, top + int(ys[nearest]) - 1


def mask_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of `width` px along the inside of a (H, W) bool mask's boundary (the image edge counts as
    boundary). Inside, so two touching instances keep one outline each."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def as_bool_masks(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, H, W) masks as a numpy bool array (a tensor may live on the GPU)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    return np.asarray(masks).astype(bool, copy=False)


def draw_overlay(
    image: Image.Image,
    masks: torch.Tensor | np.ndarray,
    labels: list[str],
    scores: list[float] | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """The image (RGB) with each of `masks` (N, H, W bool, the image's size) blended in its own colour, outlined
    in that colour, and `label score` (`label` when `scores` is None) written on a box of that colour at the
    object. Empty masks are skipped."""
    canvas = image.convert("RGB")
    masks = as_bool_masks(masks)
    if masks.ndim != 3 or masks.shape[1:] != (canvas.height, canvas.width):
        raise ValueError(f"draw_overlay: masks of shape {masks.shape}, expected (N, {canvas.height}, {canvas.width})")
    if len(labels) != len(masks) or (scores is not None and len(scores) != len(masks)):
        raise ValueError(
            f"draw_overlay: {len(masks)} masks, {len(labels)} labels, {'no' if scores is None else len(scores)} scores"
        )
    if len(masks) == 0:
        return canvas
    pixels = np.asarray(canvas).astype(np.float32)
    colors = instance_colors(len(masks))
    bounds = [mask_bounds(mask) for mask in masks]
    band = outline_width(canvas.width, canvas.height)
    for mask, color, box in zip(masks, colors, bounds):
        if box is None:
            continue
        top, bottom, left, right = box
        window, inside = pixels[top:bottom, left:right], mask[top:bottom, left:right]
        window[inside] = window[inside] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    # outlines after every blend, so a later mask's blend never dims an earlier outline
    for mask, color, box in zip(masks, colors, bounds):
        if box is None:
            continue
        top, bottom, left, right = box
        # on the bounding box alone (cheap): the erosion counts pixels beyond the array as outside the mask
        outline = mask_outline(mask[top:bottom, left:right], band)
        pixels[top:bottom, left:right][outline] = color
    overlay = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    font_size = label_font_size(canvas.width, canvas.height)
    font, margin = label_font(font_size), label_margin(font_size)
    _, cap_top, _, _ = font.getbbox("Hg", anchor="ls")
    draw = ImageDraw.Draw(overlay)
    for index, (mask, color, box) in enumerate(zip(masks, colors, bounds)):
        if box is None:
            continue
        text = labels[index] if scores is None else f"{labels[index]} {scores[index]:.2f}"
        box_w, box_h = label_box_size(text, font_size)
        x, y = place_label(label_anchor(mask), (box_w, box_h), overlay.size)
        draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=color)
        draw.text((x + margin, y + margin - cap_top), text, fill=text_color_on(color), font=font, anchor="ls")
    return overlay


# ---------------------------------------------------------------- grids


def panel_gap(cell: int) -> int:
    """White space between two panels of a grid, in px."""
    return max(2, cell // 40)


def fit_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_width: int) -> str:
    """`text`, shortened with '...' until it is at most `max_width` px wide (a title never spills over its
    neighbour)."""
    if font.getlength(text) <= max_width:
        return text
    while text and font.getlength(text + "...") > max_width:
        text = text[:-1]
    return text + "..."


def picture_grid(
    rows: list[list[Image.Image]],
    titles: list[list[str]] | None = None,
    cell: int = 320,
    heading: str | None = None,
) -> Image.Image:
    """A grid of panels: each image fitted into a `cell` x `cell` white box (aspect kept, centred), a title
    above each panel when `titles` (one per image) are given, and a `heading` line at the top. Rows may have
    different lengths."""
    columns = max((len(row) for row in rows), default=0)
    if columns == 0:
        raise ValueError("picture_grid: no images")
    if titles is not None and [len(t) for t in titles] != [len(row) for row in rows]:
        raise ValueError(
            f"picture_grid: titles per row {[len(t) for t in titles]} != images per row {[len(r) for r in rows]}"
        )
    gap = panel_gap(cell)
    title_font = label_font(max(10, cell // 20))
    title_h = band_height(title_font) if titles is not None else 0
    heading_font = label_font(max(12, cell // 14))
    heading_h = band_height(heading_font) if heading else 0
    width = columns * (cell + gap) + gap
    height = heading_h + len(rows) * (title_h + cell + gap) + gap
    grid = Image.new("RGB", (width, height), (230, 230, 230))  # light grey between white cells: panels stand apart
    draw = ImageDraw.Draw(grid)
    if heading:
        heading = fit_text(heading, heading_font, width - 2 * gap)
        draw.text((gap, heading_h // 2), heading, fill=(0, 0, 0), font=heading_font, anchor="lm")
    for r, row in enumerate(rows):
        top = heading_h + gap + r * (title_h + cell + gap)
        for c, image in enumerate(row):
            left = gap + c * (cell + gap)
            if titles is not None:
                title = fit_text(titles[r][c], title_font, cell)
                draw.text((left + cell // 2, top + title_h // 2), title, fill=(0, 0, 0), font=title_font, anchor="mm")
            panel = ImageOps.contain(image.convert("RGB"), (cell, cell))
            grid.paste((255, 255, 255), (left, top + title_h, left + cell, top + title_h + cell))
            grid.paste(panel, (left + (cell - panel.width) // 2, top + title_h + (cell - panel.height) // 2))
    return grid


def band_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """Height in px of a one-line band of text in `font`, with a little air above and below."""
    _, top, _, bottom = font.getbbox("Hg")
    return round((bottom - top) * 1.6)
