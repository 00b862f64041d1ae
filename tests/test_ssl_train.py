"""Guided Distillation end to end on the tiny synthetic set: burn-in, EMA, resume, the unsupervised term."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Mask2FormerForUniversalSegmentation

import gd_hf.method.distillation as method_module
import gd_hf.models.common as model_common
import gd_hf.run.periodic as periodic_module
import gd_hf.run.phase as phase_module
from gd_hf.config import RecipeError
from gd_hf.data.loading import repeat_factors
from gd_hf.train import train

from .conftest import DEMO_RECIPE, EOMT_TINY, ONE_LAUNCH_SSL, PAPER_JITTER, demo_recipe, tiny_overrides


@pytest.fixture(scope="module")
def teacher_dir(synthetic_root, tmp_path_factory):
    """A phase-1 export of the tiny architecture (2 steps: a weak but real teacher)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(demo_recipe(tiny_overrides(synthetic_root, out) + ["train.max_steps=2"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out / "final"


def ssl_overrides(teacher_dir, *extra):
    return [
        "ssl.enabled=true",
        f"ssl.teacher={teacher_dir}",
        "ssl.burn_in_steps=2",
        "ssl.unlabeled_batch_size=2",
        # The 2-step teacher is unsure of everything: a low threshold gives it pseudo labels to hand out.
        "ssl.pseudo_label_score_threshold=0.2",
        "ssl.pseudo_label_min_area=1",
        *extra,
    ]


def run(synthetic_root, output_dir, teacher_dir, *extra):
    overrides = tiny_overrides(synthetic_root, output_dir) + ssl_overrides(teacher_dir, *extra)
    return train(demo_recipe(overrides))


def log(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def exported_state(folder):
    """State dict of an exported folder as the model sees it (save_pretrained may rename keys on disk)."""
    return Mask2FormerForUniversalSegmentation.from_pretrained(folder).state_dict()


def teacher_state(checkpoint):
    """The EmaTeacher is saved beside the schedule as gd_hf_state_1.pt (gd_hf.run.checkpointing)."""
    state = torch.load(checkpoint / "gd_hf_state_1.pt", weights_only=True)
    return {k.removeprefix("model."): v for k, v in state.items()}


def test_teacher_is_unchanged_during_burn_in(synthetic_root, tmp_path, teacher_dir):
    out = tmp_path / "run"
    run(synthetic_root, out, teacher_dir, "ssl.burn_in_steps=10", "train.max_steps=3", "train.checkpoint_every=1")
    original = exported_state(teacher_dir)
    for step in (2, 3):
        saved = teacher_state(out / "checkpoints" / f"step_{step:08d}")
        assert all(torch.equal(saved[k], original[k]) for k in original), step
    lines = [r for r in log(out) if "loss_unsup" in r]
    assert len(lines) == 3  # guided burn-in: pseudo labels from the first step on
    assert all("pseudo_labels_per_image" in r and "pseudo_label_score" in r for r in lines)


def test_teacher_equals_student_at_the_burn_in_step_then_follows_ema(synthetic_root, tmp_path, teacher_dir):
    out = tmp_path / "run"
    # decay 0: after each EMA step the teacher is exactly the student.
    run(
        synthetic_root,
        out,
        teacher_dir,
        "ssl.burn_in_steps=2",
        "ssl.ema_decay=0.0",
        "train.max_steps=3",
        "train.checkpoint_every=1",
    )
    student = exported_state(out / "final")
    teacher = teacher_state(out / "checkpoints" / "step_00000003")
    assert all(torch.equal(teacher[k], student[k]) for k in student)
    # decay 0.5: the copy at step 2 gives the student after step 2, one EMA step mixes in step 3's student.
    out2 = tmp_path / "run2"
    run(
        synthetic_root,
        out2,
        teacher_dir,
        "ssl.burn_in_steps=2",
        "ssl.ema_decay=0.5",
        "train.max_steps=3",
        "train.checkpoint_every=1",
    )
    s2 = load_file(out2 / "checkpoints" / "step_00000002" / "model.safetensors")  # accelerate saves raw keys
    s3 = exported_state(out2 / "final")
    t3 = teacher_state(out2 / "checkpoints" / "step_00000003")
    for key in s3:
        if s3[key].is_floating_point():
            torch.testing.assert_close(t3[key], 0.5 * s2[key] + 0.5 * s3[key])


def test_unsupervised_weight_is_applied(synthetic_root, tmp_path, teacher_dir):
    out = tmp_path / "run"
    run(synthetic_root, out, teacher_dir, "ssl.unsup_loss_weight=3.0", "train.max_steps=2")
    for record in (r for r in log(out) if "loss_unsup" in r):
        assert record["loss_unsup"] > 0
        assert record["loss"] == pytest.approx(record["loss_sup"] + 3.0 * record["loss_unsup"], rel=1e-4)


def test_images_with_zero_pseudo_labels_are_trained_towards_no_object(synthetic_root, tmp_path, teacher_dir):
    out = tmp_path / "run"
    run(synthetic_root, out, teacher_dir, "ssl.pseudo_label_score_threshold=0.999999", "train.max_steps=2")
    records = [r for r in log(out) if "loss_unsup" in r]
    assert len(records) == 2
    assert all(r["pseudo_labels_per_image"] == 0 for r in records)
    assert all(r["loss_unsup"] > 0 for r in records)  # the class term still pushes queries to "no object"


def test_the_overlap_rule_of_the_recipe_reaches_the_pseudo_label_filter(
    synthetic_root, tmp_path, teacher_dir, monkeypatch
):
    seen = []
    real_filter = method_module.filter_pseudo_labels

    def spy(*args, **kwargs):
        pseudo = real_filter(*args, **kwargs)
        seen.append((args[5], sum(pseudo.counts())))  # (class_logits, mask_logits, score, area, mask, overlap, ...)
        return pseudo

    monkeypatch.setattr(method_module, "filter_pseudo_labels", spy)
    # (The teacher check, which filters too, is off: only the steps' pseudo labels are counted.)
    run(synthetic_root, tmp_path / "off", teacher_dir, "train.max_steps=2", "ssl.pseudo_label_max_overlap=null",
        "ssl.teacher_check=off")  # fmt: skip
    run(synthetic_root, tmp_path / "nms", teacher_dir, "train.max_steps=2", "ssl.pseudo_label_max_overlap=0.0",
        "ssl.teacher_check=off")  # fmt: skip
    assert [overlap for overlap, _ in seen] == [None, None, 0.0, 0.0]
    # Same teacher, same images: the rule only removes labels (IoU > 0 with a kept one), and this unsure
    # teacher's masks overlap, so some go.
    kept_off, kept_nms = sum(n for o, n in seen if o is None), sum(n for o, n in seen if o == 0.0)
    assert 0 < kept_nms < kept_off


def test_phases_2_3_draw_labeled_images_by_repeat_factor_and_phase_1_does_not(
    synthetic_root, tmp_path, teacher_dir, monkeypatch
):
    import gd_hf.data.batches as batches_module  # where the loaders are built

    samplers, datasets = [], []
    real_sampler, real_dataset = batches_module.StepBatchSampler, batches_module.LabeledTrainDataset

    def sampler_spy(**kwargs):
        samplers.append(kwargs)
        return real_sampler(**kwargs)

    def dataset_spy(hf_dataset, data):
        datasets.append(hf_dataset)
        return real_dataset(hf_dataset, data)

    monkeypatch.setattr(batches_module, "StepBatchSampler", sampler_spy)
    monkeypatch.setattr(batches_module, "LabeledTrainDataset", dataset_spy)
    run(synthetic_root, tmp_path / "rfs", teacher_dir, "train.max_steps=1", "ssl.labeled_repeat_threshold=10")
    labeled, unlabeled = samplers
    categories = [objects["category"] for objects in datasets[0]["objects"]]
    assert len(categories) == labeled["num_items"] > 1
    assert np.array_equal(labeled["repeat_factors"], repeat_factors(categories, 10.0))
    assert unlabeled["repeat_factors"] is None  # the unlabeled stream is uniform (a bug of the reference)
    samplers.clear()
    run(synthetic_root, tmp_path / "uniform", teacher_dir, "train.max_steps=1", "ssl.labeled_repeat_threshold=null")
    assert [s["repeat_factors"] for s in samplers] == [None, None]
    samplers.clear()
    overrides = tiny_overrides(synthetic_root, tmp_path / "phase1") + ["train.max_steps=1"]
    train(demo_recipe(overrides))
    assert [s["repeat_factors"] for s in samplers] == [None]


def test_labeled_only_burn_in_needs_no_teacher(synthetic_root, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + [
        "ssl.enabled=true",
        "ssl.burn_in_pseudo_labels=false",
        "ssl.student_init=pretrained",  # (the demo recipe's `teacher` needs a fixed teacher)
        "ssl.burn_in_steps=2",
        "ssl.unlabeled_batch_size=2",
        "train.max_steps=3",
    ]
    train(demo_recipe(overrides))
    records = [r for r in log(out) if "loss" in r]
    assert ["loss_unsup" in r for r in records] == [False, False, True]


def test_guided_burn_in_without_a_teacher_is_a_recipe_error(synthetic_root, tmp_path):
    with pytest.raises(RecipeError, match="ssl.teacher is required for guided burn-in"):
        demo_recipe(tiny_overrides(synthetic_root, tmp_path) + ["ssl.enabled=true"])


def test_teacher_with_other_classes_is_refused(synthetic_root, tmp_path, teacher_dir):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c", "3": "d"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2, "d": 3}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="predicts .* but the data's classes are"):
        run(synthetic_root, tmp_path / "run", other)


@pytest.mark.parametrize(
    "crash_after, streaming",
    [(1, False), (2, False), (3, False), (3, True)],
    # crash 2: right after the checkpoint of the last burn-in step, where the teacher becomes the student's copy
    ids=["in_burn_in", "at_the_burn_in_step", "in_ema", "in_ema_streaming_2_workers"],
)
def test_resume_continues_identically(synthetic_root, tmp_path, teacher_dir, monkeypatch, crash_after, streaming):
    extra = ("ssl.burn_in_steps=2", "train.max_steps=4", "train.checkpoint_every=1", "ssl.ema_decay=0.5")
    if streaming:  # both streams (labeled + unlabeled) resume from the positions saved in the checkpoint
        extra += ("data.streaming=true", "data.num_workers=2", "data.shuffle_buffer=8")
        extra += ("ssl.labeled_repeat_threshold=null",)  # a stream cannot be resampled by class
    run(synthetic_root, tmp_path / "a", teacher_dir, *extra)

    real_save = periodic_module.save_checkpoint

    def save_then_crash(accelerator, directory, step, state, keep, *rest):
        path = real_save(accelerator, directory, step, state, keep, *rest)
        if step == crash_after:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(periodic_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(synthetic_root, tmp_path / "b", teacher_dir, *extra)
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    run(synthetic_root, tmp_path / "b", teacher_dir, *extra)

    losses = lambda out: {r["step"]: (r["loss"], r.get("loss_unsup")) for r in log(out) if "loss" in r}  # noqa: E731
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = (
        load_file(tmp_path / "a" / "final" / "model.safetensors"),
        load_file(tmp_path / "b" / "final" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta = teacher_state(tmp_path / "a" / "checkpoints" / "step_00000004")
    tb = teacher_state(tmp_path / "b" / "checkpoints" / "step_00000004")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_one_launch_trains_the_teacher_then_distills_and_prints_both(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + ONE_LAUNCH_SSL
    train(demo_recipe(overrides))
    assert (out / "teacher" / "best" / "model.safetensors").is_file()  # phase 1, exported like any run
    assert (out / "final" / "model.safetensors").is_file()  # the distilled student, a vanilla checkpoint
    teacher_log = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_unsup" in r for r in teacher_log)
    assert any("loss_unsup" in r for r in log(out))
    printed = capsys.readouterr().out
    assert "supervised teacher" in printed and "distilled student" in printed


def poison_loss(monkeypatch, bad_calls):
    """Make the loss of the given loss_terms calls (1-based, one call per loss) NaN."""
    real = model_common.loss_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            terms["loss_mask"] = terms["loss_mask"] * float("nan")
        return terms

    monkeypatch.setattr(model_common, "loss_terms", poisoned)


def test_nonfinite_step_in_ema_phase_updates_neither_student_nor_teacher(
    synthetic_root, tmp_path, teacher_dir, monkeypatch
):
    # Two loss_terms calls per distillation step (labeled + unlabeled): step 3 = calls 5 and 6.
    poison_loss(monkeypatch, {5})
    out = tmp_path / "run"
    run(
        synthetic_root,
        out,
        teacher_dir,
        "ssl.burn_in_steps=1",
        "train.max_steps=4",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
    )
    checkpoints = out / "checkpoints"
    student = {k: load_file(checkpoints / f"step_0000000{s}" / "model.safetensors") for k, s in (("2", 2), ("3", 3))}
    assert all(torch.equal(student["2"][k], student["3"][k]) for k in student["2"])
    teachers = [teacher_state(checkpoints / f"step_0000000{s}") for s in (2, 3, 4)]
    assert all(torch.equal(teachers[0][k], teachers[1][k]) for k in teachers[0])  # no EMA update at step 3
    assert not all(torch.equal(teachers[1][k], teachers[2][k]) for k in teachers[1])  # step 4 updates again
    records = [r for r in log(out) if "loss" in r]
    assert records[-1]["nonfinite_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in records)  # the skipped step's NaN is not averaged in


def test_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    from gd_hf.train import main

    poison_loss(monkeypatch, set(range(3, 100)))  # supervised: one call per step; NaN from step 3 on
    out = tmp_path / "run"
    args = [DEMO_RECIPE, *tiny_overrides(synthetic_root, out)]
    assert main([*args, "train.max_steps=10", "train.max_nonfinite_steps=2"]) == 4
    err = capsys.readouterr().err
    assert "2 steps in a row were skipped (a non-finite loss" in err and "step_00000002" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]


@pytest.mark.parametrize("streaming", [False, True])
def test_an_image_folder_joins_the_unlabeled_split(synthetic_root, tmp_path, teacher_dir, streaming):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        Image.open(synthetic_root / "val" / f"100000{k}.png").save(folder / f"extra_{k}.png")
    out = tmp_path / "run"
    run(
        synthetic_root,
        out,
        teacher_dir,
        f"data.unlabeled_images={folder}",
        f"data.streaming={streaming}",
        f"ssl.labeled_repeat_threshold={'null' if streaming else 10}",  # a stream cannot be resampled by class
        "ssl.unlabeled_includes_labeled=false",
        "data.labeled_percent=50",
        "train.max_steps=2",
    )
    assert (out / "final" / "config.json").is_file()
    card = (out / "final" / "README.md").read_text()
    assert "12 labeled images (" in card and "and 15 unlabeled images, pseudo-labelled" in card  # 12 of 24 + 3 photos


def test_the_demo_recipe_runs_the_whole_method():
    """README command 1 is the method, not phase 1 alone: teacher first, then burn-in AND an EMA phase, with a
    strong view that keeps the colour the synthetic classes are told apart by."""
    recipe = demo_recipe([])
    assert recipe.ssl.enabled and recipe.ssl.train_teacher_first and recipe.ssl.burn_in_pseudo_labels
    assert recipe.ssl.teacher_max_steps and recipe.ssl.teacher_max_steps > 0
    assert 0 < recipe.ssl.burn_in_steps < recipe.train.max_steps  # both phases 2 and 3 happen
    assert recipe.ssl.strong_hue == 0 and recipe.ssl.strong_grayscale_prob == 0
    assert recipe.ssl.pseudo_label_max_overlap == 0.5  # the duplicate filter measured in benchmarks/RESULTS.md
    assert recipe.data.generate_synthetic and recipe.data.labeled_percent < 100


def test_the_log_counts_the_unlabeled_stream_the_run_reads(synthetic_root, tmp_path, teacher_dir, caplog):
    """As the paper, the unlabeled stream is every training image (24 here), not only the unlabeled split."""
    import re

    caplog.set_level("INFO", logger="gd_hf.train")
    run(synthetic_root, tmp_path / "all", teacher_dir, "train.max_steps=1", "data.labeled_percent=50")
    assert "unlabeled stream: 24 (the labeled ones included)" in caplog.text
    labeled = int(re.search(r"labeled images: (\d+), unlabeled stream", caplog.text).group(1))
    assert 0 < labeled < 24
    caplog.clear()
    rest = ("data.labeled_percent=50", "ssl.unlabeled_includes_labeled=false")
    run(synthetic_root, tmp_path / "rest", teacher_dir, "train.max_steps=1", *rest)
    assert f"labeled images: {labeled}, unlabeled stream: {24 - labeled}, val" in caplog.text


def test_the_paper_data_path_trains_every_phase_with_targets_in_the_frame_of_their_inputs(
    varied_root, tmp_path, monkeypatch
):
    """Mixed image sizes and aspect ratios, jitter 0.3-2.0: crops smaller than crop_size and non-square, labeled
    and unlabeled batches of different padded sizes. Every target that reaches the loss covers the frame of the
    predictions it is scored against (Mask2Former samples both in normalised coordinates)."""
    frames, losses = [], []
    real_one_frame, real_loss_terms = method_module.one_frame, model_common.loss_terms

    def frame_spy(labeled, unlabeled):
        frames.append((tuple(labeled["pixel_values"].shape[-2:]), tuple(unlabeled["weak_pixel_values"].shape[-2:])))
        return real_one_frame(labeled, unlabeled)

    def loss_spy(model, outputs, mask_labels, class_labels, no_object_weight=None):
        logits_frame = tuple(outputs.mask_logits.shape[-2:])
        losses.append((logits_frame, [tuple(m.shape[-2:]) for m in mask_labels], [len(c) for c in class_labels]))
        return real_loss_terms(model, outputs, mask_labels, class_labels, no_object_weight)

    monkeypatch.setattr(method_module, "one_frame", frame_spy)
    monkeypatch.setattr(model_common, "loss_terms", loss_spy)
    out = tmp_path / "run"
    overrides = tiny_overrides(varied_root, out) + ONE_LAUNCH_SSL + PAPER_JITTER
    overrides += ["ssl.teacher_max_steps=3", "train.max_steps=6", "ssl.burn_in_steps=3", "data.labeled_percent=50"]
    overrides += ["ssl.pseudo_label_score_threshold=0.2", "ssl.pseudo_label_min_area=1"]  # an unsure 3-step teacher
    train(demo_recipe(overrides))

    assert len(frames) == 6  # every student step met an unlabeled batch (burn-in and EMA)
    assert any(labeled != unlabeled for labeled, unlabeled in frames)  # the two batches padded differently
    sides = {side for pair in frames for frame in pair for side in frame}
    assert 32 in sides and any(h != w for pair in frames for h, w in pair)  # small and non-square crops
    assert len(losses) == 3 + 2 * 6  # teacher steps, then a labeled and an unlabeled loss per student step
    for logits_frame, mask_frames, _ in losses:
        for mask_frame in mask_frames:
            # Full-resolution labeled masks (x4) or pseudo labels at the teacher's mask resolution (x1).
            scale = (mask_frame[0] / logits_frame[0], mask_frame[1] / logits_frame[1])
            assert scale in ((4.0, 4.0), (1.0, 1.0)), (mask_frame, logits_frame)
    assert sum(sum(counts) for _, _, counts in losses[4::2]) > 0  # pseudo labels were handed out
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_ssl_evaluate_scores_and_exports_the_model_it_names(synthetic_root, tmp_path, teacher_dir, monkeypatch, which):
    """`ssl.evaluate`: `student` scores and exports the student; `teacher` the EMA teacher (its weights become
    the export); `both` scores both, logs the teacher as `val_teacher/*`, and exports the student."""
    evaluated = []
    real_evaluate = periodic_module.evaluate

    def spy(phase, model):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(phase, model)

    monkeypatch.setattr(periodic_module, "evaluate", spy)
    out = tmp_path / "run"
    run(synthetic_root, out, teacher_dir, "ssl.burn_in_steps=1", "train.max_steps=2", "ssl.ema_decay=0.5",
        "train.checkpoint_every=2", f"ssl.evaluate={which}")  # fmt: skip
    student = load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")  # accelerate's raw keys
    teacher = teacher_state(out / "checkpoints" / "step_00000002")
    floats = [k for k in student if student[k].is_floating_point()]
    assert any(not torch.equal(student[k], teacher[k]) for k in floats)  # decay 0.5: they differ at step 2

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in floats)

    eval_lines = [r for r in log(out) if "val/AP" in r]
    assert len(eval_lines) == 1  # the end-of-run evaluation
    if which == "both":
        assert len(evaluated) == 2 and same(evaluated[0], student) and same(evaluated[1], teacher)
        assert "val_teacher/AP" in eval_lines[0]
    else:
        assert len(evaluated) == 1 and "val_teacher/AP" not in eval_lines[0]
        assert same(evaluated[0], teacher if which == "teacher" else student)
    assert same(exported_state(out / "final"), teacher if which == "teacher" else student)


@pytest.mark.parametrize(
    "family, student_init", [("mask2former", "teacher"), ("eomt", "teacher"), ("mask2former", "pretrained")]
)
def test_student_init_teacher_starts_the_student_from_the_teacher_with_a_fresh_class_head(
    synthetic_root, tmp_path, monkeypatch, family, student_init
):
    """`ssl.student_init: teacher`: spy on the student phase 2 builds and the teacher it loads. Every weight but
    the class head is the teacher's; the class head is drawn afresh; the card says so. The paper's `pretrained`
    starts the student where the teacher started, not where it ended."""
    built, teachers = [], []
    real_build, real_teacher = phase_module.build_model, phase_module.build_teacher

    def build_spy(cfg, id2label, family_):
        model = real_build(cfg, id2label, family_)
        built.append((cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model

    def teacher_spy(recipe, student, id2label, family_):
        teacher = real_teacher(recipe, student, id2label, family_)
        if teacher is not None and recipe.ssl.teacher is not None:
            teachers.append({k: v.detach().clone() for k, v in teacher.model.state_dict().items()})
        return teacher

    monkeypatch.setattr(phase_module, "build_model", build_spy)
    monkeypatch.setattr(phase_module, "build_teacher", teacher_spy)
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + ONE_LAUNCH_SSL + [f"ssl.student_init={student_init}"]
    if family == "eomt":
        overrides += EOMT_TINY
    train(demo_recipe(overrides))

    # phase 1's model, then phase 2's student (from the teacher: after the recipe's own, whose shapes it must have)
    assert len(built) == (3 if student_init == "teacher" else 2) and len(teachers) == 1
    student_cfg, student = built[-1]
    teacher = teachers[0]
    head = {k for k in student if k.startswith("class_predictor.")}
    scheduled = {k for k in student if k.endswith("attn_mask_probs")}  # set from the step, not learned
    assert head and student.keys() == teacher.keys()
    card = (out / "final" / "README.md").read_text()
    if student_init == "teacher":
        assert student_cfg.pretrained == str(out / "teacher" / "best")
        assert all(torch.equal(student[k], teacher[k]) for k in student.keys() - head - scheduled)
        assert not any(torch.equal(student[k], teacher[k]) for k in head)
        assert "from the supervised teacher's weights (a fresh class head" in card
    else:
        assert student_cfg.pretrained is None
        learned = [k for k in student.keys() - head - scheduled if student[k].is_floating_point()]
        differ = [k for k in learned if not torch.equal(student[k], teacher[k])]
        assert len(differ) > len(learned) // 2  # the teacher trained; the student starts untrained
        assert "teacher's weights" not in card


def test_student_init_teacher_without_a_teacher_is_a_recipe_error(synthetic_root, tmp_path):
    overrides = tiny_overrides(synthetic_root, tmp_path / "run") + [
        "ssl.enabled=true", "ssl.burn_in_pseudo_labels=false", "ssl.student_init=teacher"
    ]  # fmt: skip
    with pytest.raises(
        RecipeError, match=r"ssl.student_init is `teacher`.*no fixed teacher.*ssl.student_init=pretrained"
    ):
        demo_recipe(overrides)
    with pytest.raises(RecipeError, match=r"ssl.student_init"):
        demo_recipe(["ssl.student_init=teachr"])


def test_student_init_teacher_with_a_damaged_teacher_says_where_the_path_came_from(
    synthetic_root, tmp_path, teacher_dir
):
    """The recipe never set model.pretrained: the error says the student was built from ssl.teacher."""
    import shutil

    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        RecipeError, match=r"ssl.student_init=teacher builds the student from ssl.teacher: .*weights file is"
    ):
        run(synthetic_root, tmp_path / "run", copy, "ssl.student_init=teacher")
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_student_init_teacher_of_another_architecture_is_refused(synthetic_root, tmp_path, teacher_dir):
    """The student would take the teacher's sizes, and recipe.yaml, a relaunch and the card would describe
    another model: refused before anything is written, naming a tensor that differs."""
    with pytest.raises(RecipeError, match=r"not the architecture of the recipe's model.\* settings .*queries"):
        run(synthetic_root, tmp_path / "run", teacher_dir, "ssl.student_init=teacher", "model.num_queries=6")
    assert not (tmp_path / "run").exists()
