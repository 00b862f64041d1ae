"""gd_hf.pictures and gd_hf.curves: overlays readable at any size, grids of panels, curves.png of a run's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gd_hf.curves import curve_series, curves_figure, figure_size_px, phase_marks, plot_curves
from gd_hf.pictures import (
    draw_overlay,
    instance_colors,
    label_anchor,
    label_box_size,
    label_font_size,
    mask_outline,
    outline_width,
    panel_gap,
    picture_grid,
    place_label,
    text_color_on,
)

BACKGROUND = (128, 64, 200)  # a colour no instance colour, blend or glyph edge lands on by chance


def rect_mask(height: int, width: int, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top:bottom, left:right] = True
    return mask


def pixels_of(image: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: where `image` is exactly `color`."""
    return (np.asarray(image) == np.asarray(color, np.uint8)).all(axis=-1)


def bounds(where: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the True pixels, bottom and right exclusive."""
    ys, xs = np.nonzero(where)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


# ---------------------------------------------------------------- overlays


def test_outline_carries_the_instance_colour_and_the_interior_is_blended():
    image = Image.new("RGB", (128, 128), BACKGROUND)
    mask = rect_mask(128, 128, 20, 100, 30, 110)
    out = np.asarray(draw_overlay(image, mask[None], ["cat"], alpha=0.45))
    color = np.asarray(instance_colors(1)[0])
    for y, x in ((20, 60), (99, 60), (60, 30), (60, 109), (20, 30), (99, 109)):  # on the boundary, off the label
        assert (out[y, x] == color).all(), (y, x)
    blended = np.round(np.asarray(BACKGROUND) * 0.55 + color * 0.45)
    assert np.abs(out[30, 40].astype(int) - blended).max() <= 1
    assert not (out[30, 40] == color).all()
    assert (out[10, 10] == BACKGROUND).all() and (out[110, 120] == BACKGROUND).all()  # outside: untouched


def test_outline_is_about_three_pixels_wide_at_1000_px():
    image = Image.new("RGB", (1000, 1000), BACKGROUND)
    mask = rect_mask(1000, 1000, 100, 900, 100, 900)
    out = draw_overlay(image, mask[None], ["cat"])
    color = instance_colors(1)[0]
    row = pixels_of(out, color)[300]
    assert outline_width(1000, 1000) == 3
    assert row[100:103].all() and not row[103] and not row[99]
    assert mask_outline(mask, 3)[300, 100:103].all() and not mask_outline(mask, 3)[300, 103]


def test_touching_instances_of_one_class_keep_an_outline_each():
    image = Image.new("RGB", (96, 96), BACKGROUND)
    left, right = rect_mask(96, 96, 10, 90, 5, 48), rect_mask(96, 96, 10, 90, 48, 91)
    out = np.asarray(draw_overlay(image, np.stack([left, right]), ["cat", "cat"]))
    first, second = instance_colors(2)
    assert (out[80, 47] == first).all() and (out[80, 48] == second).all()  # the shared edge: two colours


def test_label_box_lies_inside_a_big_mask_at_the_object():
    image = Image.new("RGB", (256, 256), BACKGROUND)
    mask = rect_mask(256, 256, 40, 220, 30, 230)
    out = draw_overlay(image, mask[None], ["person"], [0.87])
    color = instance_colors(1)[0]
    box = pixels_of(out, color) & ~mask_outline(mask, outline_width(256, 256))
    top, bottom, left, right = bounds(box)
    assert 40 <= top and bottom <= 220 and 30 <= left and right <= 230
    assert (bottom - top, right - left) == label_box_size("person 0.87", label_font_size(256, 256))[::-1]
    assert abs((top + bottom) / 2 - 130) <= 2 and abs((left + right) / 2 - 130) <= 2  # centred on the object
    on_box = np.asarray(out)[top:bottom, left:right].astype(int)
    nearer_text = np.abs(on_box - text_color_on(color)).sum(-1) < np.abs(on_box - color).sum(-1)
    assert nearer_text.sum() > 20  # the text is drawn on the box


def test_label_of_a_mask_at_the_image_corner_is_whole_inside_the_image():
    image = Image.new("RGB", (128, 128), BACKGROUND)
    mask = rect_mask(128, 128, 124, 128, 124, 128)  # 4 x 4 px at the bottom-right corner
    out = draw_overlay(image, mask[None], ["person"], [0.87])
    box_w, box_h = label_box_size("person 0.87", label_font_size(128, 128))
    assert bounds(pixels_of(out, instance_colors(1)[0])) == (128 - box_h, 128, 128 - box_w, 128)


def test_place_label_centres_the_box_and_clamps_it_into_the_image():
    assert place_label((50, 40), (20, 10), (100, 80)) == (40, 35)
    assert place_label((0, 0), (20, 10), (100, 80)) == (0, 0)
    assert place_label((100, 80), (20, 10), (100, 80)) == (80, 70)
    assert place_label((50, 40), (300, 10), (100, 80)) == (0, 35)  # wider than the image: from its left edge


def test_label_anchor_is_inside_a_ring():
    yy, xx = np.mgrid[:101, :101]
    radius = np.hypot(yy - 50, xx - 50)
    ring = (radius > 30) & (radius < 45)
    x, y = label_anchor(ring)
    assert ring[y, x] and not ring[50, 50]


def test_label_text_grows_with_the_image():
    assert label_font_size(64, 64) == 10 and label_font_size(64, 2000) == 10  # the short side counts
    assert label_font_size(1024, 1024) == round(1024 / 28)
    assert outline_width(64, 64) == 1
    heights = []
    for size in (64, 1024):
        image = Image.new("RGB", (size, size), BACKGROUND)
        mask = rect_mask(size, size, size // 8, size - size // 8, size // 16, size - size // 16)
        out = draw_overlay(image, mask[None], ["dog"], [0.5])
        box = pixels_of(out, instance_colors(1)[0]) & ~mask_outline(mask, outline_width(size, size))
        rows = np.flatnonzero(box.any(axis=1))  # pixel rows the label box changed
        heights.append(len(rows))
        assert len(rows) == label_box_size("dog 0.50", label_font_size(size, size))[1]
    assert heights[1] >= 2.5 * heights[0]


def test_no_instances_return_the_image_unchanged_as_rgb():
    image = Image.new("L", (40, 30), 77)
    for masks in (np.zeros((0, 30, 40), bool), torch.zeros(0, 30, 40, dtype=torch.bool)):
        out = draw_overlay(image, masks, [], [])
        assert out.mode == "RGB" and out.tobytes() == image.convert("RGB").tobytes()


def test_empty_masks_are_skipped():
    image = Image.new("RGB", (64, 64), BACKGROUND)
    mask = rect_mask(64, 64, 10, 50, 10, 50)
    with_empty = draw_overlay(image, np.stack([np.zeros_like(mask), mask]), ["a", "b"], [0.1, 0.9])
    alone = draw_overlay(image, mask[None], ["b"], [0.9])
    changed = ~pixels_of(with_empty, BACKGROUND)
    assert (changed == ~pixels_of(alone, BACKGROUND)).all()  # the same pixels drawn: nothing for the empty mask
    assert not pixels_of(with_empty, instance_colors(2)[0]).any()


def test_tensor_and_array_masks_draw_the_same():
    image = Image.new("RGB", (64, 48), BACKGROUND)
    masks = np.stack([rect_mask(48, 64, 5, 30, 5, 30), rect_mask(48, 64, 20, 45, 25, 60)])
    from_array = draw_overlay(image, masks, ["a", "b"], [0.3, 0.7])
    from_tensor = draw_overlay(image, torch.from_numpy(masks), ["a", "b"], [0.3, 0.7])
    assert from_array.tobytes() == from_tensor.tobytes()


def test_masks_of_another_size_or_count_are_an_error():
    image = Image.new("RGB", (64, 48))
    with pytest.raises(ValueError, match="masks of shape"):
        draw_overlay(image, np.zeros((1, 64, 48), bool), ["a"])
    with pytest.raises(ValueError, match="1 masks, 2 labels"):
        draw_overlay(image, np.zeros((1, 48, 64), bool), ["a", "b"])


def test_label_text_contrasts_with_its_box():
    assert text_color_on((255, 255, 0)) == (0, 0, 0)
    assert text_color_on((0, 0, 128)) == (255, 255, 255)


# ---------------------------------------------------------------- grids


def test_grid_size_follows_the_rows_and_the_cell():
    small = Image.new("RGB", (30, 20))
    gap = panel_gap(100)
    grid = picture_grid([[small, small, small], [small]], cell=100)
    assert grid.size == (3 * (100 + gap) + gap, 2 * (100 + gap) + gap)
    titled = picture_grid([[small, small, small], [small]], [["a", "b", "c"], ["d"]], cell=100, heading="run")
    assert titled.width == grid.width and titled.height > grid.height
    band = np.asarray(titled)[: titled.height - grid.height]  # heading and title bands hold dark text
    assert (band.max(axis=-1) < 80).any()


def test_grid_keeps_each_panel_aspect_and_centres_it():
    red, blue = Image.new("RGB", (200, 100), (255, 0, 0)), Image.new("RGB", (12, 48), (0, 0, 255))
    grid = picture_grid([[red, blue]], cell=100)
    gap = panel_gap(100)
    assert bounds(pixels_of(grid, (255, 0, 0))) == (gap + 25, gap + 75, gap, gap + 100)
    left = 2 * gap + 100
    assert bounds(pixels_of(grid, (0, 0, 255))) == (gap, gap + 100, left + 37, left + 62)  # enlarged to fit


def test_grid_refuses_titles_that_do_not_match_and_no_images():
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="titles per row"):
        picture_grid([[image, image]], [["only one"]])
    with pytest.raises(ValueError, match="no images"):
        picture_grid([[]])


# ---------------------------------------------------------------- curves

SUPERVISED_LOG = [
    {"step": s, "loss": 30 / (1 + s / 100), "loss_cross_entropy": 2.0, "lr": 1e-4, "grad_norm": 40.0}
    for s in range(50, 501, 50)
] + [{"step": s, "val/AP": 10 + s / 50, "val/AP50": 20 + s / 50, "val/APl": -1.0} for s in (250, 500)]

DISTILLATION_LOG = (
    [
        {
            "step": 0,
            "teacher_check/precision": 0.39,
            "teacher_check/recall": 0.43,
            "teacher_check/pseudo_labels_per_image": 3.04,
        }
    ]
    + [
        {
            "step": s,
            "loss_sup": 26.18 / (1 + s / 300),
            "loss_unsup": 26.43 / (1 + s / 30),
            "loss": 26.18 / (1 + s / 300) + 26.43 / (1 + s / 30),
            "pseudo_labels_per_image": 3.36,
            "pseudo_label_score": 0.85,
            "pseudo_precision": 0.449,
            "pseudo_recall": 0.449,
            "seconds_per_step": 2.48,
        }
        for s in range(1000, 0, -50)  # records in any order
    ]
    + [{"step": s, "val/AP": 25.5, "val/AP50": 45.7, "val/APl": -1, "val_teacher/AP": 23.6} for s in (500, 1000)]
)
PHASES = [(0, "guided burn-in"), (700, "EMA distillation")]


def test_curve_series_sorts_by_step_and_drops_negative_ap_and_non_finite_values():
    records = [
        {"step": 20, "val/AP": 30.0, "val/APl": -1, "loss": float("nan")},
        {"step": 10, "val/AP": 20.0, "val/APl": 44.4, "loss": 5.0},
        {"step": 30, "val/AP": float("inf"), "loss": 4.0, "lr": 1e-4},
        {"step": 40, "loss": None},
        {"step": 10, "loss": 6.0},  # the same step logged again (a resumed run): the later line counts
        {"loss": 1.0},  # no step: not plotted
    ]
    series = curve_series(records)
    assert series["val/AP"] == ([10, 20], [20.0, 30.0])
    assert series["val/APl"] == ([10], [44.4])
    assert series["loss"] == ([10, 30], [6.0, 4.0])
    assert set(series) == {"val/AP", "val/APl", "loss"}


def test_plot_curves_returns_none_when_nothing_is_plottable(tmp_path):
    records = [{"step": 0, "lr": 1e-4}, {"step": 10, "val/APl": -1.0, "loss": float("nan")}]
    assert plot_curves(records, tmp_path) is None
    assert plot_curves([], tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_plot_curves_writes_a_png_of_a_supervised_log(tmp_path):
    path = plot_curves(SUPERVISED_LOG, tmp_path, title="supervised")
    assert path == tmp_path / "curves.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == figure_size_px(2) == (1200, 450)  # AP and loss
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


def test_plot_curves_writes_a_png_of_a_distillation_log(tmp_path):
    path = plot_curves(DISTILLATION_LOG, tmp_path / "run" / "curves.png", PHASES)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == figure_size_px(4) == (1200, 800)


def test_a_failed_write_leaves_the_previous_png(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = plot_curves(SUPERVISED_LOG, tmp_path)
    before = path.read_bytes()

    def crash(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", crash)
    with pytest.raises(OSError, match="disk full"):
        plot_curves(DISTILLATION_LOG, tmp_path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_phase_marks_put_a_boundary_after_the_first_phase_within_the_steps():
    assert phase_marks(PHASES, 0, 1000) == ([700], [(0, "guided burn-in"), (700, "EMA distillation")])
    assert phase_marks(PHASES[::-1], 0, 1000) == ([700], [(0, "guided burn-in"), (700, "EMA distillation")])
    assert phase_marks(PHASES, 0, 500) == ([], [(0, "guided burn-in")])  # not reached yet: no line
    assert phase_marks(PHASES, 800, 1000) == ([], [(800, "EMA distillation")])  # a log resumed in phase 2
    assert phase_marks([], 0, 1000) == ([], [])


def test_every_panel_shows_the_phase_boundary_and_names():
    figure = curves_figure(curve_series(DISTILLATION_LOG), PHASES)
    panels = [ax for ax in figure.axes if ax.get_title()]  # not the twin score axis
    assert len(panels) == 4
    for ax in panels:
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and line.get_color() == "0.4"]
        assert [list(line.get_xdata()) for line in dashed] == [[700, 700]]
        assert {text.get_text().strip() for text in ax.texts} == {"guided burn-in", "EMA distillation"}
        assert ax.get_xlim()[0] < 0 < 1000 < ax.get_xlim()[1]  # the step-0 teacher check markers shown whole


def test_ap_panel_never_plots_negative_ap():
    figure = curves_figure(curve_series(DISTILLATION_LOG))
    ap_panel = next(ax for ax in figure.axes if ax.get_title() == "val mask AP")
    labels = {line.get_label() for line in ap_panel.get_lines()}
    assert "AP" in labels and "teacher AP" in labels and "APl" not in labels  # (a supervised run has no student)
    assert all(min(line.get_ydata()) >= 0 for line in ap_panel.get_lines())
    assert math.isclose(max(max(line.get_ydata()) for line in ap_panel.get_lines()), 45.7)


def test_a_pseudo_label_with_an_empty_mask_is_counted_apart_and_not_drawn(monkeypatch):
    """The soft-area rule can keep a query whose hard mask is empty: the picture's title says so instead of
    counting a label it cannot show, and only the drawable ones reach the overlay."""
    import torch

    import gd_hf.run.eval_pictures as eval_pictures

    square = torch.zeros(2, 16, 16)
    square[0, 4:12, 4:12] = 1.0  # one drawable mask; the second is empty
    kept = eval_pictures.KeptPseudoLabels(
        step=7, weak_pixel_values=torch.zeros(1, 3, 64, 64), masks=[square], classes=[torch.tensor([1, 2])],
        scores=[torch.tensor([0.9, 0.8])], hidden_masks=[torch.zeros(0, 64, 64)], hidden_classes=[torch.zeros(0)],
    )  # fmt: skip
    drawn, titles = [], []
    real_overlay = eval_pictures.overlay_in_panel
    monkeypatch.setattr(eval_pictures, "overlay_in_panel",
                        lambda view, masks, labels, scores=None: drawn.append(labels) or real_overlay(view, masks, labels, scores))  # fmt: skip
    monkeypatch.setattr(eval_pictures, "picture_grid", lambda rows, t, cell, heading: titles.append(t))
    eval_pictures.pseudo_label_picture(kept, ["circle", "rectangle", "triangle"])
    assert drawn == [["rectangle"]]
    assert titles == [[["pseudo labels: 1 (+1 with an empty mask)"]]]
