"""Pictures of a run, pure drawing: instance overlays, grids of panels and the curves of `metrics.jsonl`.

Called at every evaluation, by `gd_hf.predict`, by the Space and by the model card, so everything here is fast,
deterministic and needs no display: matplotlib draws on a `Figure` with its Agg canvas (no pyplot, no global
state) and is imported only when curves are plotted.
"""

from __future__ import annotations

import colorsys
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from scipy import ndimage

from gd_hf.files import replace_durably

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


# ---------------------------------------------------------------- curves

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# The metrics.jsonl keys the curves show, in drawing order.
SERIES_KEYS = (
    *(f"val/{k}" for k in AP_KEYS),
    *(f"val_teacher/{k}" for k in AP_KEYS),
    "loss",
    "loss_sup",
    "loss_unsup",
    "pseudo_labels_per_image",
    "pseudo_label_score",
    "pseudo_precision",
    "pseudo_recall",
    "teacher_check/precision",
    "teacher_check/recall",
    "teacher_check/pseudo_labels_per_image",
    "teacher_check/score_threshold",
    "teacher_check/score_threshold_auto",
)
FIGURE_WIDTH_PX = 1200
DPI = 100


def is_plottable(key: str, value: Any) -> bool:
    """A finite number; for AP also not negative (COCO's -1: no object of that size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not ("/AP" in key and value < 0)


def curve_series(records: Sequence[dict[str, Any]]) -> Series:
    """{key: (steps, values)} of the plotted keys in `records` (parsed metrics.jsonl lines, in any order),
    sorted by step. Values that are not finite numbers and negative APs are dropped; a key logged twice at one
    step (a resumed run) keeps the later line. Lines without a numeric `step` are skipped: a picture never
    stops a run."""
    points: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not is_plottable("step", step):
            continue
        for key in SERIES_KEYS:
            if is_plottable(key, record.get(key)):
                points.setdefault(key, {})[int(step)] = float(record[key])
    return {
        key: (sorted(points[key]), [points[key][s] for s in sorted(points[key])])
        for key in SERIES_KEYS
        if key in points
    }


def phase_marks(
    phases: Sequence[tuple[int, str]], first_step: int, last_step: int
) -> tuple[list[int], list[tuple[int, str]]]:
    """(boundary steps, [(label step, name)]) of the `phases` [(start step, name)] that start by `last_step`:
    a boundary at each start after the first, a name at each start (at `first_step` for a phase already under
    way when the log begins)."""
    started = sorted((start, name) for start, name in phases if start <= last_step)
    boundaries = [start for start, _ in started[1:] if start > first_step]
    labels = []
    for (start, name), next_start in zip(started, [start for start, _ in started[1:]] + [math.inf]):
        if next_start > first_step:  # under way while the log runs (a resumed log may begin in a later phase)
            labels.append((max(start, first_step), name))
    return boundaries, labels


def plot_ap(ax: Axes, series: Series) -> list[Axes]:
    """Panel: validation mask AP of the evaluated model (`val/`: the student, or a supervised run's model), the
    teacher's (`val_teacher/`, with `ssl.evaluate: both`) dashed."""
    for who, style, prefix in (("val", "-", ""), ("val_teacher", "--", "teacher ")):
        for key, width in (("AP", 2.2), ("AP50", 1.4), ("APs", 0.8), ("APm", 0.8), ("APl", 0.8)):
            if f"{who}/{key}" in series:
                steps, values = series[f"{who}/{key}"]
                ax.plot(steps, values, style, lw=width, marker=".", label=f"{prefix}{key}")
    ax.set_title("val mask AP")
    ax.set_ylabel("AP")
    return [ax]


def plot_losses(ax: Axes, series: Series) -> list[Axes]:
    """Panel: total, supervised and unsupervised loss; a log axis when they span more than 10x."""
    shown = [key for key in ("loss", "loss_sup", "loss_unsup") if key in series]
    for key in shown:
        ax.plot(*series[key], lw=1.4, label=key)
    values = [v for key in shown for v in series[key][1]]
    if min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_title("training loss")
    return [ax]


def plot_pseudo_label_counts(ax: Axes, series: Series) -> list[Axes]:
    """Panel: pseudo labels per image (the teacher check's as a marker), mean pseudo-label score on a twin axis."""
    if "pseudo_labels_per_image" in series:
        ax.plot(*series["pseudo_labels_per_image"], lw=1.4, color="C0", label="per image")
    if "teacher_check/pseudo_labels_per_image" in series:
        ax.plot(*series["teacher_check/pseudo_labels_per_image"], "D", ms=8, color="C0", label="teacher check")
    ax.set_title("pseudo labels per image")
    ax.set_ylim(bottom=0)  # a count: from zero, so a change reads at its true size
    if "pseudo_label_score" in series:
        twin = ax.twinx()
        twin.plot(*series["pseudo_label_score"], ":", lw=1.4, color="C1", label="mean score (right)")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("score")
        # the counts' axes above the twin, so its legend (placed away from the counts) is not drawn over
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        return [ax, twin]
    return [ax]


def threshold_label(series: Series) -> str:
    """`, score threshold 0.45 (auto)`: the pseudo-label threshold the teacher check measured (chose, with
    `auto`), for the panel's title; '' when the log has none."""
    if "teacher_check/score_threshold" not in series:
        return ""
    auto = " (auto)" if "teacher_check/score_threshold_auto" in series else ""
    return f", score threshold {series['teacher_check/score_threshold'][1][-1]:g}{auto}"


def plot_pseudo_label_quality(ax: Axes, series: Series) -> list[Axes]:
    """Panel: pseudo-label precision and recall against the hidden labels, the teacher check's as markers."""
    for key, color in (("precision", "C0"), ("recall", "C1")):
        if f"pseudo_{key}" in series:
            ax.plot(*series[f"pseudo_{key}"], lw=1.4, color=color, label=key)
        if f"teacher_check/{key}" in series:
            ax.plot(*series[f"teacher_check/{key}"], "D", ms=8, color=color, label=f"teacher check {key}")
    ax.set_ylim(0, 1.02)
    ax.set_title("pseudo-label precision / recall" + threshold_label(series))
    return [ax]


# (draw function, keys any one of which makes the panel worth drawing)
PANELS = (
    (plot_ap, [f"{who}/{k}" for who in ("val", "val_teacher") for k in AP_KEYS]),
    (plot_losses, ["loss", "loss_sup", "loss_unsup"]),
    (plot_pseudo_label_counts, ["pseudo_labels_per_image", "teacher_check/pseudo_labels_per_image"]),
    (
        plot_pseudo_label_quality,
        ["pseudo_precision", "pseudo_recall", "teacher_check/precision", "teacher_check/recall"],
    ),
)


def leave_headroom(ax: Axes, fraction: float = 0.1) -> None:
    """Raise the top of `ax`'s y axis by `fraction` of its height (of its decades on a log axis): room for the
    phase names, so they are not written over the curves."""
    bottom, top = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(bottom, top * (top / bottom) ** fraction)
    else:
        ax.set_ylim(bottom, top + (top - bottom) * fraction)


def figure_size_px(panels: int) -> tuple[int, int]:
    """(width, height) of curves.png with `panels` panels: one row up to two, 2 x 2 from three."""
    return (FIGURE_WIDTH_PX, 450) if panels <= 2 else (FIGURE_WIDTH_PX, 800)


def curves_figure(series: Series, phases: Sequence[tuple[int, str]] = (), title: str | None = None) -> Figure | None:
    """The figure of `series` (from `curve_series`) with `phases` marked; None when no panel has data."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    panels = [draw for draw, keys in PANELS if any(key in series for key in keys)]
    if not panels:
        return None
    width, height = figure_size_px(len(panels))
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    grid = (1, len(panels)) if len(panels) <= 2 else (2, 2)
    steps = [s for xs, _ in series.values() for s in xs]
    first_step, last_step = min(steps), max(steps)
    boundaries, names = phase_marks(phases, first_step, last_step)
    for index, draw in enumerate(panels):
        ax = figure.add_subplot(*grid, index + 1)
        drawn = draw(ax, series)
        # every panel on one step axis, so phases line up; a margin keeps the step-0 markers whole
        margin = max(last_step - first_step, 1) * 0.02
        ax.set_xlim(first_step - margin, last_step + margin)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for step in boundaries:
            ax.axvline(step, ls="--", color="0.4", lw=1)
        if names:
            for axes in drawn:
                leave_headroom(axes)
        on_top = blended_transform_factory(ax.transData, ax.transAxes)  # x in steps, y along the panel's top
        for step, name in names:
            ax.text(step, 0.98, f" {name}", transform=on_top, va="top", ha="left", fontsize="small", color="0.3")
        handles, labels = [], []
        for axes in drawn:
            axes_handles, axes_labels = axes.get_legend_handles_labels()
            handles, labels = handles + axes_handles, labels + axes_labels
        ax.legend(handles, labels, loc="best", fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def plot_curves(
    records: list[dict[str, Any]],
    out: str | Path,
    phases: Sequence[tuple[int, str]] = (),
    title: str | None = None,
) -> Path | None:
    """Write the curves of a run's metrics.jsonl `records` as a PNG and return its path; None (nothing written)
    when there is nothing to plot. `out`: a `.png` path, or a folder to write `curves.png` in. `phases`:
    [(start step, name)], marked by a dashed line at each boundary and their names along each panel's top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = curves_figure(curve_series(records), phases, title)
    if figure is None:
        return None
    out = Path(out)
    path = out if out.suffix.lower() == ".png" else out / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # same folder: the rename is atomic
    try:
        FigureCanvasAgg(figure).print_png(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        figure.clear()  # a Figure without pyplot is not registered anywhere: freed once unreferenced
    return path
