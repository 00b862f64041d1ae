"""`ssl.teacher_check`: before distilling, the teacher's pseudo labels are measured on val; a teacher that would
teach "no object" or wrong labels stops the run (exit 2, nothing written), `warn` goes on, `off` skips it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import gd_hf.method.teacher_check as check_module
import gd_hf.run.periodic as periodic_module
import gd_hf.train as train_module
from gd_hf.data.prepare import prepare_data
from gd_hf.method import PseudoLabelRules
from gd_hf.method.teacher_check import measure_teacher
from gd_hf.models import build_model
from gd_hf.models.mask2former import build_image_processor, padding_divisor
from gd_hf.run.distributed import build_accelerator
from gd_hf.train import main, train

from .conftest import DEMO_RECIPE, ROOT, demo_recipe, tiny_overrides
from .test_one_frame import LOGIT, perfect_outputs


def squares_folder(root: Path, images: int) -> Path:
    """A COCO folder of black images with red squares (class 0): what `perfect_outputs` segments exactly."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records, annotations = [], []
    for k in range(images):
        pixels = np.zeros((64, 64, 3), np.uint8)
        top, left = (int(v) for v in rng.integers(4, 36, 2))
        pixels[top : top + 24, left : left + 24, 0] = 255
        Image.fromarray(pixels).save(root / "images" / f"{k}.png")
        records.append({"id": k + 1, "file_name": f"{k}.png", "width": 64, "height": 64})
        box = [left, top, left + 24, top, left + 24, top + 24, left, top + 24]
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[float(v) for v in box]]})  # fmt: skip
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "other"}]
    (root / "instances.json").write_text(json.dumps({"images": records, "annotations": annotations,
                                                     "categories": categories}))  # fmt: skip
    return root


def squares_overrides(root: Path, out: Path, teacher: Path, *extra: str) -> list[str]:
    data = [f"data.{split}_{key}={path}" for split in ("train", "val")
            for key, path in (("images", root / "images"), ("annotations", root / "instances.json"))]  # fmt: skip
    return (
        tiny_overrides(root, out)
        + data
        + [
            "ssl.enabled=true",
            f"ssl.teacher={teacher}",
            "ssl.burn_in_steps=1",
            "ssl.unlabeled_batch_size=2",
            "train.max_steps=2",
            "data.min_scale=1.0",
            "data.max_scale=1.0",
            "data.labeled_percent=50",
            "ssl.teacher_check=stop",  # the default (tiny_overrides sets warn for the other tests)
            *extra,
        ]
    )


@pytest.fixture
def squares(tmp_path):
    return squares_folder(tmp_path / "squares", 8)


def export_teacher(folder: Path, recipe) -> Path:
    """A random-init export of the recipe's architecture (what a run's `best/` holds after 0 steps)."""
    torch.manual_seed(0)
    model = build_model(recipe.model, {0: "square", 1: "other"})
    model.save_pretrained(folder)
    build_image_processor(model, recipe.data).save_pretrained(folder)
    return folder


def make_teacher_perfect(monkeypatch, right_class: bool = True):
    """Every Mask2Former forward of a model that is not training (the teacher) segments the red square
    exactly, with the right class or the other one: a teacher whose figures are known."""
    from transformers import Mask2FormerForUniversalSegmentation

    real_forward = Mask2FormerForUniversalSegmentation.forward

    def forward(self, pixel_values, **kwargs):
        if self.training:
            return real_forward(self, pixel_values=pixel_values, **kwargs)
        outputs = perfect_outputs(pixel_values, self.config.num_queries, 2, torch.zeros(()))
        if not right_class:  # the square, called "other"
            logits = outputs.class_queries_logits.clone()
            logits[:, 0] = torch.tensor([-LOGIT, LOGIT, -LOGIT])
            outputs.class_queries_logits = logits
        return outputs

    monkeypatch.setattr(Mask2FormerForUniversalSegmentation, "forward", forward)


def test_a_random_init_teacher_is_stopped_before_anything_is_written(squares, tmp_path, capsys):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    out = tmp_path / "run"
    assert main([DEMO_RECIPE, *squares_overrides(squares, out, teacher)]) == 2
    err = capsys.readouterr()
    assert "the teacher" in err.err and "should not teach" in err.err
    assert "ssl.teacher_check=warn" in err.err and "ssl.pseudo_label_score_threshold=" in err.err
    assert "teacher check on 8 val images" in err.out  # the table came first
    assert not out.exists() or not any(out.iterdir())  # nothing written but the teacher


def test_a_teacher_that_teaches_passes_and_its_figures_reach_the_log_and_the_card(
    squares, tmp_path, monkeypatch, capsys
):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    make_teacher_perfect(monkeypatch)
    out = tmp_path / "run"
    train(demo_recipe(squares_overrides(squares, out, teacher)))
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "teacher_check" in x]
    assert line["step"] == 0
    assert line["teacher_check/precision"] == 1.0 and line["teacher_check/recall"] == 1.0
    assert line["teacher_check/pseudo_labels_per_image"] == line["teacher_check/objects_per_image"] == 1.0
    card = (out / "final" / "README.md").read_text()
    assert "Teacher check before distillation (8 val images" in card and "failed this check" not in card
    assert line["teacher_check/passed"] == 1.0
    assert "precision" in capsys.readouterr().out


def test_a_teacher_of_wrong_labels_stops_with_stop_and_goes_on_with_warn(squares, tmp_path, monkeypatch, caplog):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    make_teacher_perfect(monkeypatch, right_class=False)
    with pytest.raises(check_module.TeacherCheckError, match="only 0% of its pseudo labels are right"):
        train(demo_recipe(squares_overrides(squares, tmp_path / "stopped", teacher)))
    out = tmp_path / "warned"
    train(demo_recipe(squares_overrides(squares, out, teacher, "ssl.teacher_check=warn")))
    assert "should not teach" in caplog.text
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "teacher_check" in x]
    assert line["teacher_check/precision"] == 0.0 and line["teacher_check/fp_wrong_class"] == 1.0
    # The card does not pass the failure off as a precision figure.
    assert line["teacher_check/passed"] == 0.0
    card = (out / "final" / "README.md").read_text()
    assert "**The teacher failed this check**" in card and "(`ssl.teacher_check: warn`)" in card


def test_off_skips_the_check_and_a_resumed_run_does_not_repeat_it(squares, tmp_path, monkeypatch):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    calls = []
    real = check_module.measure_teacher
    monkeypatch.setattr(check_module, "measure_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(demo_recipe(squares_overrides(squares, tmp_path / "off", teacher, "ssl.teacher_check=off")))
    assert calls == []
    out = tmp_path / "resumed"
    warn = ("ssl.teacher_check=warn", "train.checkpoint_every=1")
    real_save = periodic_module.save_checkpoint
    save_then_crash = save_then_crash_at(real_save, 1)
    monkeypatch.setattr(periodic_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(demo_recipe(squares_overrides(squares, out, teacher, *warn)))
    assert calls == [1]
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    train(demo_recipe(squares_overrides(squares, out, teacher, *warn)))
    assert calls == [1]  # checked at the run's start, not at the resume
    lines = [x for x in (out / "metrics.jsonl").read_text().splitlines() if "teacher_check" in x]
    assert len(lines) == 1  # and logged once


def test_the_check_and_the_benchmark_measure_the_same(squares, tmp_path, monkeypatch):
    """benchmarks/pseudo_label_quality.py and the run's check share `measure_teacher`: on the same images and
    threshold their figures agree."""
    recipe = demo_recipe(squares_overrides(squares, tmp_path / "run", tmp_path / "teacher"))
    model = build_model(recipe.model, {0: "square", 1: "other"}).eval()
    make_teacher_perfect(monkeypatch)
    data = prepare_data(recipe, build_accelerator(recipe))
    figures = check_module.check_teacher(model, data.val, recipe, padding_divisor(model), show=False)
    spec = importlib.util.spec_from_file_location("plq", ROOT / "benchmarks" / "pseudo_label_quality.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    threshold = recipe.ssl.pseudo_label_score_threshold
    table = benchmark.quality_table(model, data.val, recipe, recipe.ssl.teacher_check_images, [threshold])
    row = next(line for line in table.splitlines() if line.startswith(f"| {threshold} |"))
    per_image, precision, recall = (float(v) for v in row.split("|")[2:5])
    assert (per_image, precision, recall) == (
        round(figures["pseudo_labels_per_image"], 2),
        round(figures["precision"], 2),
        round(figures["recall"], 2),
    )
    direct = measure_teacher(model, data.val, recipe.data, PseudoLabelRules.from_recipe(recipe.ssl),
                             padding_divisor(model))[threshold]  # fmt: skip
    assert direct.figures()["precision"] == figures["precision"] == 1.0


# -- ssl.pseudo_label_score_threshold: auto --------------------------------------------------------------------


def report(threshold: float, labels: int, correct: int, objects: int = 10) -> check_module.TeacherReport:
    return check_module.TeacherReport(threshold, 10, objects, labels, correct)


def test_auto_chooses_the_lowest_threshold_whose_precision_reaches_the_target():
    # A hand-built sweep, precision not monotone in the threshold: 0.50, 0.62, 0.80, 0.58, and no labels at 0.9.
    sweep = {0.3: report(0.3, 20, 10), 0.45: report(0.45, 13, 8), 0.5: report(0.5, 10, 8), 0.6: report(0.6, 12, 7),
             0.9: report(0.9, 0, 0)}  # fmt: skip
    assert check_module.choose_threshold(sweep, 0.6).threshold == 0.45
    assert check_module.choose_threshold(sweep, 0.5).threshold == 0.3  # reached exactly
    assert check_module.choose_threshold(sweep, 0.7).threshold == 0.5
    assert check_module.choose_threshold(sweep, 0.81) is None  # a threshold without pseudo labels is no answer
    assert check_module.AUTO_THRESHOLDS[0] == 0.05 and check_module.AUTO_THRESHOLDS[-1] == 0.95


def make_teacher_scored(monkeypatch, right: float, wrong: float):
    """The teacher segments the red square exactly with two queries: query 0 calls it a square with probability
    `right`, query 1 calls it "other" with probability `wrong` (precision 1 between the two scores, 0.5 below,
    without the mask NMS, which would drop the second)."""
    from transformers import Mask2FormerForUniversalSegmentation

    real_forward = Mask2FormerForUniversalSegmentation.forward

    def forward(self, pixel_values, **kwargs):
        if self.training:
            return real_forward(self, pixel_values=pixel_values, **kwargs)
        outputs = perfect_outputs(pixel_values, self.config.num_queries, 2, torch.zeros(()))
        masks, logits = outputs.masks_queries_logits.clone(), outputs.class_queries_logits.clone()
        masks[:, 1] = masks[:, 0]
        rest = (1 - right) / 2
        logits[:, 0] = torch.tensor([right, rest, rest]).log()
        logits[:, 1] = torch.tensor([(1 - wrong) / 2, wrong, (1 - wrong) / 2]).log()
        outputs.masks_queries_logits, outputs.class_queries_logits = masks, logits
        return outputs

    monkeypatch.setattr(Mask2FormerForUniversalSegmentation, "forward", forward)


SWEEP = 2 * 19  # the check's filterings of the 8 squares: 2 batches x 19 thresholds


def spy_thresholds(monkeypatch) -> list[float]:
    """The score thresholds of every pseudo-label filtering: the teacher check's sweep (19 thresholds, once per
    batch of its 8 images, 4 a batch), then the student's steps (what flows into the loss)."""
    import gd_hf.method.distillation as method_module

    used, real = [], method_module.filter_pseudo_labels
    monkeypatch.setattr(method_module, "filter_pseudo_labels",
                        lambda c, m, threshold, *a: used.append(threshold) or real(c, m, threshold, *a))  # fmt: skip
    return used


def test_auto_threshold_reaches_the_rule_the_log_the_checkpoint_the_card_and_the_curves(
    squares, tmp_path, monkeypatch, capsys
):
    from gd_hf.curves import curve_series, threshold_label

    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    make_teacher_scored(monkeypatch, right=0.62, wrong=0.42)
    used = spy_thresholds(monkeypatch)
    out = tmp_path / "run"
    auto = ("ssl.pseudo_label_score_threshold=auto", "ssl.pseudo_label_target_precision=0.6",
            "train.checkpoint_every=1", "ssl.pseudo_label_max_overlap=null")  # fmt: skip
    train(demo_recipe(squares_overrides(squares, out, teacher, *auto)))
    assert sorted(set(used[:SWEEP])) == list(check_module.AUTO_THRESHOLDS)
    assert used[SWEEP:] == [0.45, 0.45]  # both steps' pseudo labels: the lowest threshold at precision >= 0.6
    printed = capsys.readouterr().out
    assert "auto chose 0.45" in printed and "0.45 |" in printed and "<- chosen" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (line,) = [r for r in records if "teacher_check/precision" in r]
    assert line["teacher_check/score_threshold"] == 0.45 and line["teacher_check/score_threshold_auto"] == 1.0
    assert line["teacher_check/precision"] == 1.0 and line["teacher_check/target_precision"] == 0.6
    assert line["teacher_check/precision_at_0.4"] == 0.5 and line["teacher_check/labels_per_image_at_0.4"] == 2.0
    assert line["teacher_check/labels_per_image_at_0.65"] == 0.0 and line["teacher_check/target_reached"] == 1.0
    state = json.loads(next((out / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["pseudo_label_score_threshold"] == 0.45
    card = (out / "final" / "README.md").read_text()
    assert "pseudo-label score threshold 0.45" in card
    assert "chosen by `ssl.pseudo_label_score_threshold: auto`" in card and "precision 0.6 on these images" in card
    assert "0.4: 0.50 / 1.00" in card  # the sweep it was chosen on
    assert threshold_label(curve_series(records)) == ", score threshold 0.45 (auto)"
    # training it again chooses again
    assert yaml.safe_load((out / "final" / "recipe.yaml").read_text())["ssl"]["pseudo_label_score_threshold"] == "auto"


def test_a_resume_keeps_the_chosen_threshold_and_one_that_would_choose_another_is_not_silent(
    squares, tmp_path, monkeypatch
):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    out = tmp_path / "run"
    auto = ("ssl.pseudo_label_score_threshold=auto", "ssl.pseudo_label_target_precision=0.6",
            "train.checkpoint_every=1", "train.max_steps=3", "ssl.pseudo_label_max_overlap=null")  # fmt: skip
    real_save = periodic_module.save_checkpoint
    save_then_crash = save_then_crash_at(real_save, 1)
    make_teacher_scored(monkeypatch, right=0.62, wrong=0.42)
    monkeypatch.setattr(periodic_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(demo_recipe(squares_overrides(squares, out, teacher, *auto)))
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    # The same teacher: the run goes on with its threshold, the check's line is logged once.
    make_teacher_scored(monkeypatch, right=0.62, wrong=0.42)
    used = spy_thresholds(monkeypatch)
    monkeypatch.setattr(periodic_module, "save_checkpoint", save_then_crash_at(real_save, 2))
    with pytest.raises(KeyboardInterrupt):
        train(demo_recipe(squares_overrides(squares, out, teacher, *auto)))
    assert used[SWEEP:] == [0.45]  # the check ran again (to compare), the step used the recorded choice
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    # A teacher that now scores higher: auto would choose 0.55. Not silently: the relaunch stops, nothing written.
    make_teacher_scored(monkeypatch, right=0.72, wrong=0.52)
    before = (out / "run_info.json").read_text()
    with pytest.raises(train_module.RecipeError, match=r"chose 0.45 at the run's start .* now chooses 0.55"):
        train(demo_recipe(squares_overrides(squares, out, teacher, *auto)))
    assert (out / "run_info.json").read_text() == before
    used.clear()
    train(demo_recipe(squares_overrides(squares, out, teacher, *auto, "resume=force")))
    assert used[SWEEP:] == [0.55]  # step 3, the last
    launches = json.loads((out / "run_info.json").read_text())
    assert launches[-1]["recipe_changes"]["ssl.pseudo_label_score_threshold (auto)"] == [0.45, 0.55]
    # logged at the start and again when the threshold changed (the curves show the new one); not at the plain resume
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "teacher_check/precision" in x]
    assert [(x["step"], x["teacher_check/score_threshold"]) for x in lines] == [(0, 0.45), (2, 0.55)]


def save_then_crash_at(real_save, crash_step: int):
    def save(accelerator, directory, step, *rest):
        path = real_save(accelerator, directory, step, *rest)
        if step == crash_step:
            raise KeyboardInterrupt("simulated crash")
        return path

    return save


def test_auto_stops_a_teacher_that_reaches_the_target_nowhere_with_exit_2_and_the_figures(
    squares, tmp_path, monkeypatch, capsys
):
    recipe = demo_recipe(tiny_overrides(squares, tmp_path / "x"))
    teacher = export_teacher(tmp_path / "teacher", recipe)
    make_teacher_perfect(monkeypatch, right_class=False)  # every pseudo label has the wrong class
    out = tmp_path / "run"
    auto = ("ssl.pseudo_label_score_threshold=auto", "ssl.pseudo_label_target_precision=0.6")
    assert main([DEMO_RECIPE, *squares_overrides(squares, out, teacher, *auto)]) == 2
    err = capsys.readouterr().err
    assert "reach the target precision 0.6" in err and "at no score threshold from 0.05 to 0.95" in err
    assert "0.50 |           1.00 |      0.00 |   0.00" in err  # the sweep's figures, one line per threshold
    assert "ssl.pseudo_label_target_precision" in err and "ssl.teacher_check=warn" in err
    assert not out.exists() or not any(out.iterdir())
    # warn distills anyway, at the sweep's most precise threshold (all tie at 0: the lowest)
    used = spy_thresholds(monkeypatch)
    train(demo_recipe(squares_overrides(squares, tmp_path / "warned", teacher, *auto,
                                                "ssl.teacher_check=warn")))  # fmt: skip
    assert used[SWEEP:] == [0.05, 0.05]
    card = (tmp_path / "warned" / "final" / "README.md").read_text()
    assert "no threshold of 0.05-0.95 reached the target precision 0.6" in card and "reached precision" not in card
    assert "**The teacher failed this check**" in card


@pytest.mark.parametrize(
    "extra, message",
    [
        (("ssl.teacher_check=off",), "which the teacher check chooses, and ssl.teacher_check is off"),
        (("ssl.teacher=null", "ssl.burn_in_pseudo_labels=false"), "this run has none that teaches"),
        (("ssl.burn_in_pseudo_labels=false",), "this run has none that teaches"),  # a teacher that never teaches
        (("ssl.burn_in_steps=0",), "this run has none that teaches"),
        (("ssl.pseudo_label_target_precision=0.2",), "is below ssl.teacher_check_min_precision (0.3)"),
        (("ssl.pseudo_label_target_precision=0",), "ssl.pseudo_label_target_precision"),
        (("ssl.pseudo_label_score_threshold=1.5",), "must be in [0, 1) or `auto`"),
        (
            ("ssl.pseudo_label_score_threshold=high",),
            "ssl.pseudo_label_score_threshold: 'high' is not a number or 'auto'",
        ),
    ],
)
def test_auto_needs_the_check_and_a_fixed_teacher(squares, tmp_path, extra, message):
    overrides = squares_overrides(squares, tmp_path / "run", tmp_path / "teacher",
                                  "ssl.pseudo_label_score_threshold=auto", *extra)  # fmt: skip
    with pytest.raises(train_module.RecipeError, match=re.escape(message)):
        demo_recipe(overrides)


def test_auto_refuses_a_custom_rule_without_a_threshold(squares, tmp_path):
    recipe = demo_recipe(squares_overrides(squares, tmp_path / "run", tmp_path / "teacher",
                                                   "ssl.pseudo_label_score_threshold=auto"))  # fmt: skip
    with pytest.raises(train_module.RecipeError, match="has no score threshold for it to choose"):
        train_module.TrainingRecipe(recipe, pseudo_label_rule=lambda c, m: None)

    class Fixed(PseudoLabelRules):  # a subclass with a threshold of its own
        pass

    with pytest.raises(train_module.RecipeError, match="or a fixed one"):
        train_module.TrainingRecipe(recipe, pseudo_label_rule=Fixed(score_threshold=0.5))
    unresolved = PseudoLabelRules.from_recipe(recipe.ssl)  # the recipe's own rules, passed in: accepted
    assert unresolved.score_threshold is None
    train_module.TrainingRecipe(recipe, pseudo_label_rule=unresolved)
    with pytest.raises(RuntimeError, match="no threshold has been chosen yet"):
        unresolved(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, 4))


def test_a_checkpoint_written_before_the_new_keys_resumes_unchanged_unless_they_are_set(squares, tmp_path):
    from gd_hf.config import recipe_to_dict
    from gd_hf.run.launches import check_relaunch

    recipe = demo_recipe(squares_overrides(squares, tmp_path / "run", tmp_path / "teacher"))
    before = recipe_to_dict(recipe)
    for key in ("pseudo_label_target_precision", "pseudo_label_min_mask_pixels"):
        del before["ssl"][key]  # what a checkpoint of the code before these keys records
    assert check_relaunch(recipe, recipe, {"recipe": before}, tmp_path / "step_1") == {}
    changed = demo_recipe(squares_overrides(squares, tmp_path / "run", tmp_path / "teacher",
                                                    "ssl.pseudo_label_min_mask_pixels=3"))  # fmt: skip
    with pytest.raises(train_module.RecipeError, match="ssl.pseudo_label_min_mask_pixels"):
        check_relaunch(changed, changed, {"recipe": before}, tmp_path / "step_1")
