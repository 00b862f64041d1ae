"""The curves of a run's `metrics.jsonl` (`curves.png`): validation AP, the losses, the pseudo labels and the
teacher check over the steps, phases marked. matplotlib draws on a `Figure` with its Agg canvas (no pyplot, no
global state, no display) and is imported only when curves are plotted."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gd_hf.files import replace_durably

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = dict[str, tuple[list[int], list[float]]]


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
