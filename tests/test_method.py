"""`gd_hf.method` without an Accelerator: the loss of a micro-batch is L_sup + w * L_unsup computed by hand from
the same outputs, the schedule (the copy at burn-in's end, the EMA after each update), and the two extension
points plugged in from Python: a pseudo-label rule and a model family, each shown to take effect in a real run."""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

import gd_hf.run.distributed as distributed
from gd_hf.config import RecipeError, SslConfig
from gd_hf.method import GuidedDistillation, Predictions, PseudoLabelRules, check_extension_points
from gd_hf.method.pseudo_labels import PseudoLabels, filter_pseudo_labels
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models import build_model
from gd_hf.models.common import loss_terms
from gd_hf.models.mask2former import Mask2FormerFamily
from gd_hf.train import train

from .conftest import ONE_LAUNCH_SSL, ROOT, demo_recipe, tiny_overrides
from .test_method_flow import ID2LABEL, batches


class RecordingFamily(Mask2FormerFamily):
    """Mask2Former, keeping the student's last predictions (what the loss is computed from)."""

    def forward(self, model, pixel_values):
        self.predictions = super().forward(model, pixel_values)
        return self.predictions


@pytest.fixture
def tiny(synthetic_root, tmp_path):
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    torch.manual_seed(0)
    student, teacher = build_model(recipe.model, ID2LABEL), build_model(recipe.model, ID2LABEL)
    student.eval()  # no dropout: the only random draws left are the loss's sampled points
    # A random-init teacher: keep every query it ranks above "no object".
    ssl = dataclasses.replace(recipe.ssl, enabled=True, unsup_loss_weight=2.5, pseudo_label_score_threshold=0.0,
                              pseudo_label_min_area=1)  # fmt: skip
    return SimpleNamespace(student=student, teacher=EmaTeacher(teacher), ssl=ssl)


def test_the_loss_is_the_supervised_loss_plus_the_weighted_unsupervised_loss(tiny):
    seen = {}
    tiny.teacher.model.register_forward_hook(lambda _module, _args, out: seen.update(teacher=out))
    tiny.student.register_forward_hook(
        lambda _module, _args, kwargs, out: seen.update(student=out, student_input=kwargs["pixel_values"]),
        with_kwargs=True,
    )
    method = GuidedDistillation(tiny.ssl, Mask2FormerFamily(), tiny.teacher)
    labeled, unlabeled = batches()  # 48x64 labeled, 64x40 unlabeled: one frame of 64x64
    torch.manual_seed(1)
    loss, logged = method.loss(tiny.student, tiny.student, labeled, unlabeled)

    # By hand, from the raw outputs of the two forward passes, with transformers' own matched loss and none of
    # gd_hf's helpers: pseudo labels of the teacher's output, labeled masks padded to the student's input frame,
    # the labeled rows against their masks, the strong rows against the pseudo labels, the same random points.
    teacher_out, student_out, student_input = seen["teacher"], seen["student"], seen["student_input"]
    pseudo = filter_pseudo_labels(teacher_out.class_queries_logits, teacher_out.masks_queries_logits, 0.0, 1,
                                  tiny.ssl.pseudo_label_mask_threshold, tiny.ssl.pseudo_label_max_overlap)  # fmt: skip
    assert sum(pseudo.counts()) > 0
    n = labeled["pixel_values"].shape[0]
    assert student_input.shape[0] == n + unlabeled["strong_pixel_values"].shape[0]
    height, width = student_input.shape[-2:]
    masks = [F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in labeled["mask_labels"]]

    def matched_loss(rows: slice, mask_labels: list, class_labels: list) -> torch.Tensor:
        auxiliary = [{key: value[rows] for key, value in aux.items()} for aux in student_out.auxiliary_logits]
        terms = tiny.student.get_loss_dict(student_out.masks_queries_logits[rows], student_out.class_queries_logits[rows],
                                           mask_labels, class_labels, auxiliary)  # fmt: skip
        return sum(terms.values())

    torch.manual_seed(1)
    l_sup = matched_loss(slice(0, n), masks, labeled["class_labels"])
    l_unsup = matched_loss(slice(n, None), pseudo.mask_labels, pseudo.class_labels)
    assert torch.allclose(loss, l_sup + 2.5 * l_unsup, rtol=1e-6, atol=0)
    assert torch.allclose(logged["loss_sup"], l_sup) and torch.allclose(logged["loss_unsup"], l_unsup)
    assert float(l_unsup.detach()) > 0  # the weight acts on a real term
    assert logged["pseudo_labels_per_image"] == sum(pseudo.counts()) / len(pseudo.counts())
    loss.backward()  # the loss backpropagates into the student and not into the teacher
    assert any(p.grad is not None for p in tiny.student.parameters())
    assert all(p.grad is None for p in tiny.teacher.model.parameters())


def test_the_unsupervised_no_object_weight_reaches_only_the_pseudo_label_class_loss(tiny, monkeypatch):
    """`ssl.unsup_no_object_weight`: spy on the class weights that reach cross-entropy. The labeled rows keep the
    model's "no object" weight (0.1), the pseudo-label rows get the recipe's, on every decoder layer; the model's
    criterion is left as it was and the loss still backpropagates."""
    seen = []
    cross_entropy = F.cross_entropy

    def spy(input, target, weight=None, *args, **kwargs):
        seen.append(None if weight is None else round(float(weight[-1]), 6))
        return cross_entropy(input, target, weight, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    ssl = dataclasses.replace(tiny.ssl, unsup_no_object_weight=0.02)
    criterion_weights = tiny.student.criterion.empty_weight
    labeled, unlabeled = batches()
    loss, _ = GuidedDistillation(ssl, Mask2FormerFamily(), tiny.teacher).loss(tiny.student, tiny.student, labeled,
                                                                            unlabeled)  # fmt: skip
    layers = tiny.student.config.decoder_layers  # the final layer and the auxiliary ones (decoder_layers - 1)
    assert seen == [0.1] * layers + [0.02] * layers
    assert tiny.student.criterion.empty_weight is criterion_weights and float(criterion_weights[-1]) == pytest.approx(
        0.1
    )
    loss.backward()
    assert any(p.grad is not None for p in tiny.student.parameters())
    seen.clear()  # left at null, the paper's loss: the model's weight everywhere
    GuidedDistillation(tiny.ssl, Mask2FormerFamily(), tiny.teacher).loss(tiny.student, tiny.student, labeled, unlabeled)
    assert seen == [0.1] * (2 * layers)


def test_a_family_whose_loss_takes_no_no_object_weight_is_refused_when_the_recipe_sets_it(tiny):
    class OldFamily(Mask2FormerFamily):
        def loss(self, model, predictions, mask_labels, class_labels):
            return super().loss(model, predictions, mask_labels, class_labels)

    class KeywordFamily(Mask2FormerFamily):
        def loss(self, model, predictions, mask_labels, class_labels, **options):
            return super().loss(model, predictions, mask_labels, class_labels, **options)

    check_extension_points(None, OldFamily(), tiny.ssl)  # not asked for: fine
    check_extension_points(None, KeywordFamily(), dataclasses.replace(tiny.ssl, unsup_no_object_weight=0.02))
    with pytest.raises(TypeError, match="takes no `no_object_weight` keyword"):
        check_extension_points(None, OldFamily(), dataclasses.replace(tiny.ssl, unsup_no_object_weight=0.02))
    with pytest.raises(RecipeError, match=r"ssl.unsup_no_object_weight.*\(0, 1\]"):
        demo_recipe(["ssl.unsup_no_object_weight=0"])


def test_without_unlabeled_images_the_loss_is_the_supervised_loss(tiny):
    method = GuidedDistillation(tiny.ssl, Mask2FormerFamily(), tiny.teacher)
    labeled, _ = batches()
    torch.manual_seed(1)
    loss, logged = method.loss(tiny.student, tiny.student, labeled, None)
    torch.manual_seed(1)
    by_hand = sum(loss_terms(tiny.student, Mask2FormerFamily().forward(tiny.student, labeled["pixel_values"]),
                             labeled["mask_labels"], labeled["class_labels"]).values())  # fmt: skip
    assert torch.equal(loss, by_hand)
    assert "loss_unsup" not in logged and set(logged) == {"loss", "loss_cross_entropy", "loss_mask", "loss_dice"}


def test_the_schedule_copies_the_student_at_burn_ins_end_and_then_follows_it_by_ema():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 3), EmaTeacher(torch.nn.Linear(3, 3))
    method = GuidedDistillation(SslConfig(enabled=True, burn_in_steps=2, ema_decay=0.5), Mask2FormerFamily(), teacher)
    frozen = copy.deepcopy(teacher.model.state_dict())
    for step in (0, 1):  # burn-in: the teacher is fixed, whatever the student does
        assert not method.start_step(step, student).burn_in_ended
        method.after_step(step, student, update_skipped=False)
        assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in frozen.items())
    assert method.start_step(2, student).burn_in_ended  # the first EMA step: teacher <- student
    assert torch.equal(teacher.model.weight, student.weight)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.model.weight.clone()
    method.after_step(2, student, update_skipped=True)  # a skipped update moves nothing
    assert torch.equal(teacher.model.weight, before)
    method.after_step(2, student, update_skipped=False)
    assert torch.allclose(teacher.model.weight, 0.5 * before + 0.5 * student.weight)
    assert not method.start_step(3, student).burn_in_ended  # the copy happens once


def test_burn_in_without_pseudo_labels_trains_on_labeled_data_only():
    teacher = EmaTeacher(torch.nn.Linear(1, 1))
    with_labels = GuidedDistillation(SslConfig(enabled=True, burn_in_steps=2), Mask2FormerFamily(), teacher)
    without = GuidedDistillation(SslConfig(enabled=True, burn_in_steps=2, burn_in_pseudo_labels=False),
                                 Mask2FormerFamily(), teacher)  # fmt: skip
    assert [with_labels.uses_pseudo_labels(s) for s in range(4)] == [True] * 4
    assert [without.uses_pseudo_labels(s) for s in range(4)] == [False, False, True, True]
    assert not GuidedDistillation.supervised(Mask2FormerFamily()).uses_pseudo_labels(0)
    with pytest.raises(ValueError, match="needs a teacher"):
        GuidedDistillation(SslConfig(enabled=True), Mask2FormerFamily())


def test_pseudo_label_rules_are_the_recipes_four_rules_and_the_overlap_rule():
    ssl = SslConfig(pseudo_label_score_threshold=0.6, pseudo_label_min_area=3.0, pseudo_label_mask_threshold=0.4,
                    pseudo_label_max_overlap=0.5)  # fmt: skip
    rules = PseudoLabelRules.from_recipe(ssl)
    assert rules == PseudoLabelRules(0.6, 3.0, 0.4, 0.5)
    torch.manual_seed(0)
    class_logits, mask_logits = 3 * torch.randn(2, 10, 4), 3 * torch.randn(2, 10, 8, 8)
    by_rules, by_filter = rules(class_logits, mask_logits), filter_pseudo_labels(class_logits, mask_logits, 0.6, 3.0,
                                                                                 0.4, 0.5)  # fmt: skip
    assert by_rules.counts() == by_filter.counts() and sum(by_rules.counts()) > 0
    assert all(torch.equal(a, b) for a, b in zip(by_rules.mask_labels, by_filter.mask_labels))
    assert rules.with_score_threshold(0.99).score_threshold == 0.99 and rules.score_threshold == 0.6


# -- extension points, plugged in from Python -----------------------------------------------------------------


class TopKPerImage:
    """docs/method.md's example rule: the recipe's rules, then only the `k` highest-scoring labels of each image."""

    def __init__(self, k: int, rules: PseudoLabelRules) -> None:
        self.k, self.rules = k, rules

    def __call__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> PseudoLabels:
        pseudo = self.rules(class_logits, mask_logits)
        keep = [scores.argsort(descending=True)[: self.k] for scores in pseudo.scores]
        return PseudoLabels([m[i] for m, i in zip(pseudo.mask_labels, keep)],
                            [c[i] for c, i in zip(pseudo.class_labels, keep)],
                            [s[i] for s, i in zip(pseudo.scores, keep)])  # fmt: skip


def distill(synthetic_root, out, teacher_dir, *extra: str, **extension_points) -> list[dict]:
    overrides = tiny_overrides(synthetic_root, out) + [
        "ssl.enabled=true", f"ssl.teacher={teacher_dir}", "ssl.burn_in_steps=1", "ssl.unlabeled_batch_size=4",
        "ssl.pseudo_label_score_threshold=0.0", "ssl.pseudo_label_min_area=1", "ssl.pseudo_label_max_overlap=null",
        "train.max_steps=2", "train.log_every=1", *extra,
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(overrides), **extension_points)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(tiny_overrides(synthetic_root, out) + ["train.max_steps=2"]))
    return out / "final"


def test_a_custom_pseudo_label_rule_plugged_in_from_python_takes_effect(synthetic_root, tmp_path, teacher_dir):
    default = distill(synthetic_root, tmp_path / "default", teacher_dir)
    top_1 = distill(synthetic_root, tmp_path / "top1", teacher_dir,
                    pseudo_label_rule=TopKPerImage(1, PseudoLabelRules(score_threshold=0.0, min_soft_area=1)))  # fmt: skip
    per_image = [r["pseudo_labels_per_image"] for r in default if "pseudo_labels_per_image" in r]
    per_image_top_1 = [r["pseudo_labels_per_image"] for r in top_1 if "pseudo_labels_per_image" in r]
    assert len(per_image) == len(per_image_top_1) == 2
    assert all(n > 1 for n in per_image)  # the teacher keeps every query at threshold 0
    assert all(n == 1 for n in per_image_top_1)  # the custom rule kept one per image
    # The teacher check measured the run's rule too: one label per image.
    check = next(r for r in top_1 if "teacher_check/pseudo_labels_per_image" in r)
    assert check["teacher_check/pseudo_labels_per_image"] <= 1
    assert "teacher_check/score_threshold" not in check  # a custom rule has none (and no NaN is logged)
    json.loads((tmp_path / "top1" / "metrics.jsonl").read_text().splitlines()[0], parse_constant=pytest.fail)
    card = (tmp_path / "top1" / "final" / "README.md").read_text()
    assert "a custom pseudo-label rule" in card and "pseudo_label_rule = tests.test_method.TopKPerImage." in card
    assert "TopKPerImage(k=1" not in card  # the class only: a rule's settings may name this machine's files


class PaddedTo96(Mask2FormerFamily):
    """A custom family: Mask2Former whose inputs are padded to multiples of 96 (the data's crops and eval images
    are 64 px: only this family makes them 96), counting what the method asks."""

    def __init__(self) -> None:
        self.calls = {"forward": [], "loss": 0, "predict": [], "load_pretrained": 0}

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return 96

    def forward(self, model, pixel_values: torch.Tensor) -> Predictions:
        self.calls["forward"].append(tuple(pixel_values.shape[-2:]))
        return super().forward(model, pixel_values)

    def loss(self, model, predictions, mask_labels, class_labels):
        self.calls["loss"] += 1
        return super().loss(model, predictions, mask_labels, class_labels)

    def predict(self, model, pixel_values: torch.Tensor) -> Predictions:
        self.calls["predict"].append(tuple(pixel_values.shape[-2:]))
        return super().predict(model, pixel_values)

    def load_pretrained(self, path: str) -> torch.nn.Module:
        self.calls["load_pretrained"] += 1
        return super().load_pretrained(path)


def test_a_custom_model_family_plugged_in_from_python_is_what_the_method_uses(synthetic_root, tmp_path, teacher_dir):
    family = PaddedTo96()
    distill(synthetic_root, tmp_path / "run", teacher_dir, model_family=family)
    assert family.calls["load_pretrained"] == 1  # ssl.teacher, loaded by the family
    assert len(family.calls["forward"]) == 2 and family.calls["loss"] == 4  # two steps, L_sup and L_unsup each
    # The teacher check's, the method's and the evaluation's predictions, and every student input: 96 px frames.
    assert len(family.calls["predict"]) > 2  # the teacher check, two steps' pseudo labels, the evaluation
    for height, width in family.calls["forward"] + family.calls["predict"]:
        assert height % 96 == 0 and width % 96 == 0
    processor = json.loads((tmp_path / "run" / "final" / "preprocessor_config.json").read_text())
    assert processor["size_divisor"] == 96  # the export pads as training evaluated
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "model_family = tests.test_method.PaddedTo96." in card


def test_a_one_launch_run_runs_both_phases_on_one_accelerator_and_ends_it_once(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.run.distributed as distributed

    made, ended = [], []

    class CountingAccelerator(distributed.Accelerator):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

        def end_training(self):
            ended.append(1)
            super().end_training()

    monkeypatch.setattr(distributed, "Accelerator", CountingAccelerator)
    import gc
    import weakref

    import gd_hf.run.phase as phase_module

    built, alive_at_build = [], []
    real_build_model = phase_module.build_model

    def build_model_spy(*args, **kwargs):
        gc.collect()
        alive_at_build.append([ref() is not None for ref in built])  # the models of earlier phases
        model = real_build_model(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(phase_module, "build_model", build_model_spy)
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + ONE_LAUNCH_SSL + [
        "ssl.teacher_max_steps=2", "train.max_steps=2", "ssl.burn_in_steps=1", "train.checkpoint_every=2",
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(overrides))
    assert made == [1] and ended == [1]
    # Phase 1's student is gone before phase 2 builds its own; the demo's student starts from the teacher
    # (`ssl.student_init: teacher`), after the recipe's model whose shapes it must have, itself gone by then.
    assert alive_at_build == [[], [False], [False, False]]
    # Phase 1's model and optimizer are not part of phase 2's checkpoints (one model, one optimizer each).
    for folder in (out / "teacher" / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002"):
        names = sorted(p.name for p in folder.iterdir())
        assert "model.safetensors" in names and "optimizer.bin" in names
        assert not [n for n in names if n.startswith(("model_", "optimizer_"))], names
    assert (out / "teacher" / "final" / "model.safetensors").is_file() and (
        out / "final" / "model.safetensors"
    ).is_file()


def test_a_relaunch_with_another_pseudo_label_rule_is_stopped_like_a_changed_recipe_key(
    synthetic_root, tmp_path, teacher_dir
):
    """A custom rule is not a recipe key: the checkpoints record its class and settings, and a relaunch that drops
    it or changes it changes what is trained."""
    from gd_hf.config import RecipeError

    out = tmp_path / "run"
    rules = PseudoLabelRules(score_threshold=0.0, min_soft_area=1)
    distill(synthetic_root, out, teacher_dir, pseudo_label_rule=TopKPerImage(1, rules))
    trainer_state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    top_1 = f"tests.test_method.TopKPerImage(k=1, rules={rules!r})"
    assert trainer_state["extension_points"] == {"pseudo_label_rule": top_1}
    with pytest.raises(RecipeError, match=r"python:pseudo_label_rule: 'tests.test_method.TopKPerImage\(k=1, .*"
                       r"-> \"the recipe's\""):  # fmt: skip
        distill(synthetic_root, out, teacher_dir, "train.max_steps=3")
    with pytest.raises(RecipeError, match=r"TopKPerImage\(k=1, .* -> 'tests.test_method.TopKPerImage\(k=3, "):
        distill(synthetic_root, out, teacher_dir, "train.max_steps=3", pseudo_label_rule=TopKPerImage(3, rules))
    logged = distill(synthetic_root, out, teacher_dir, "train.max_steps=3", pseudo_label_rule=TopKPerImage(1, rules))
    assert [r["pseudo_labels_per_image"] for r in logged if "pseudo_labels_per_image" in r] == [1.0] * 3


def test_an_explicit_pseudo_label_rules_that_differs_from_the_recipe_is_refused(synthetic_root, tmp_path):
    """The recipe, the checkpoints and the card name the ssl.pseudo_label_* keys: a `PseudoLabelRules` passed
    from Python must not silently disagree with them."""
    from gd_hf.config import RecipeError
    from gd_hf.train import TrainingRecipe

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    with pytest.raises(RecipeError, match="set those keys instead"):
        TrainingRecipe(recipe, pseudo_label_rule=PseudoLabelRules(score_threshold=0.9))
    TrainingRecipe(recipe, pseudo_label_rule=PseudoLabelRules.from_recipe(recipe.ssl))  # the same rules: fine


def test_the_rule_runs_in_full_precision_inside_the_loops_autocast(tiny):
    """The loop calls the loss inside its autocast (bf16 on GPUs): the teacher predicts there, but the rule's
    arithmetic (mask NMS counts pixels) must not be rounded to bf16."""
    autocast_seen = []

    def spy_rule(class_logits, mask_logits):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return PseudoLabelRules(score_threshold=0.0, min_soft_area=1)(class_logits, mask_logits)

    method = GuidedDistillation(tiny.ssl, Mask2FormerFamily(), tiny.teacher, spy_rule)
    labeled, unlabeled = batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method.loss(tiny.student, tiny.student, labeled, unlabeled)
        assert torch.is_autocast_enabled("cpu")  # the loop's autocast is back on after the rule
    assert autocast_seen == [False]


def test_the_end_of_phase_1_starts_phase_2_with_a_fresh_loss_scale(synthetic_root, tmp_path):
    """fp16 (GPU) keeps a GradScaler on the Accelerator, which both phases share: phase 2 starts from a fresh
    one, as it did on an Accelerator of its own. (There is no GradScaler on a CPU Accelerator: one is put there.)
    That phase 1's objects are gone by then: test_a_one_launch_run_runs_both_phases_on_one_accelerator_...)"""
    from gd_hf.train import TrainingRecipe

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    training = TrainingRecipe(recipe)
    AcceleratorState._reset_state(reset_partial_state=True)
    training.accelerator = distributed.build_accelerator(recipe)
    training.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    training.fresh_scaler_state = copy.deepcopy(training.accelerator.scaler.state_dict())
    training.accelerator.scaler.scale(torch.ones(()))  # as phase 1's steps would leave it: scale 8
    training.accelerator.scaler.update(new_scale=8.0)
    assert training.accelerator.scaler.get_scale() == 8.0
    training.end_phase()
    assert training.accelerator.scaler.state_dict() == training.fresh_scaler_state
    assert training.accelerator.scaler.get_scale() == 2.0**16


def test_the_readme_example_rule_runs_as_written(monkeypatch):
    """docs/method.md's "Extending the method" example, executed: it passes a rule that keeps the top 3 per image."""
    import re

    import gd_hf.train as train_module

    readme = (ROOT / "docs" / "method.md").read_text()
    section = readme[readme.index("## Extending the method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in code.splitlines())  # list indent
    passed = {}
    monkeypatch.setattr(train_module, "train", lambda recipe, **kwargs: passed.update(kwargs))
    exec(compile(code, "docs/method.md", "exec"), {})
    rule = passed["pseudo_label_rule"]
    torch.manual_seed(0)
    class_logits = torch.zeros(2, 10, 4)
    class_logits[..., 0] = torch.linspace(1, 10, 10)  # every query confident in class 0, ten different scores
    mask_logits = torch.full((2, 10, 16, 16), -20.0)
    for query in range(10):  # ten disjoint strips: the recipe's mask NMS keeps them all
        mask_logits[:, query, query] = 20.0
    pseudo = rule(class_logits, mask_logits)
    assert pseudo.counts() == [3, 3]
    assert all(torch.equal(s, s.sort(descending=True).values[:3]) for s in pseudo.scores)
    assert all(float(s.min()) > float(torch.softmax(class_logits[0, 6], -1).max()) for s in pseudo.scores)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda p: [p.mask_labels, p.class_labels], "returned a list, not PseudoLabels"),
        (lambda p: PseudoLabels(p.mask_labels[:1], p.class_labels[:1], p.scores[:1]), "lists of 1/1/1 for 2 images"),
        (
            lambda p: PseudoLabels([m[:, ::2] for m in p.mask_labels], p.class_labels, p.scores),
            "masks \\(N, 16, 16\\) expected",
        ),
        (
            lambda p: PseudoLabels(p.mask_labels, [c.float() for c in p.class_labels], p.scores),
            "integers in \\[0, 4\\)",
        ),
        (
            lambda p: PseudoLabels(p.mask_labels, [c * 0 + 4 for c in p.class_labels], p.scores),
            "integers in \\[0, 4\\)",
        ),
        (  # soft masks: the loss trains on them (it went to -63)
            lambda p: PseudoLabels([m * 0.5 for m in p.mask_labels], p.class_labels, p.scores),
            "masks with values other than 0 and 1",
        ),
        (lambda p: PseudoLabels([m * float("nan") for m in p.mask_labels], p.class_labels, p.scores), "other than 0"),
        (lambda p: PseudoLabels(p.mask_labels, p.class_labels, [s * float("nan") for s in p.scores]), "non-finite"),
    ],
)
def test_a_rule_whose_answer_does_not_fit_is_named_at_its_first_step(tiny, answer, message):
    """A custom rule's wrong answer stops at the first step naming the rule and what is wrong, instead of an
    error deep in the Hungarian matcher (or a silently wrong target)."""
    rules = PseudoLabelRules(score_threshold=0.0, min_soft_area=1)

    class Broken:
        def __call__(self, class_logits, mask_logits):
            return answer(rules(class_logits, mask_logits))

    method = GuidedDistillation(tiny.ssl, Mask2FormerFamily(), tiny.teacher, Broken())
    labeled, unlabeled = batches()
    with pytest.raises(TypeError, match=f"the pseudo-label rule tests\\.test_method\\..*Broken\\(\\) .*{message}"):
        method.loss(tiny.student, tiny.student, labeled, unlabeled)


def test_extension_points_that_cannot_serve_are_refused_before_any_work(synthetic_root, tmp_path):
    from gd_hf.train import TrainingRecipe

    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    with pytest.raises(TypeError, match="pseudo_label_rule must be callable .* got 'top3'"):
        TrainingRecipe(recipe, pseudo_label_rule="top3")

    class HalfAFamily(Mask2FormerFamily):
        predict = None  # a family that forgot how its teacher predicts

    with pytest.raises(TypeError, match="model_family HalfAFamily lacks the ModelFamily method\\(s\\) predict"):
        TrainingRecipe(recipe, model_family=HalfAFamily())
    with pytest.raises(TypeError, match="lacks the ModelFamily method\\(s\\) forward, loss, padding_divisor"):
        TrainingRecipe(recipe, model_family=object())
    assert not tmp_path.joinpath("checkpoints").exists()


def test_the_phases_a_run_goes_through_start_where_the_step_says():
    """One schedule: the curves' phase marks are `phase` of each phase's first step, as the bar's labels are."""
    from gd_hf.config import SslConfig
    from gd_hf.models.mask2former import Mask2FormerFamily

    family, teacher = Mask2FormerFamily(), EmaTeacher(torch.nn.Linear(1, 1))
    method = GuidedDistillation(SslConfig(enabled=True, burn_in_steps=3), family, teacher)
    assert method.phase_starts(10) == [(0, "burn_in"), (3, "ema")]
    assert method.phase_starts(3) == [(0, "burn_in")]  # the run ends before EMA
    assert GuidedDistillation(SslConfig(enabled=True, burn_in_steps=0), family, teacher).phase_starts(5) == [(0, "ema")]
    assert GuidedDistillation.supervised(family).phase_starts(5) == [(0, "supervised")]


def test_a_rule_whose_answer_does_not_fit_is_named_by_the_teacher_check_too(synthetic_root, tmp_path, teacher_dir):
    """With the teacher check on (the default), the rule first answers there: the same named error, not an
    AttributeError from the check's counting."""
    from gd_hf.train import train

    class Broken:
        def __call__(self, class_logits, mask_logits):
            return [class_logits]

    overrides = [*tiny_overrides(synthetic_root, tmp_path / "run"), "ssl.enabled=true", f"ssl.teacher={teacher_dir}",
                 "ssl.teacher_check=warn", "ssl.burn_in_steps=1", "ssl.unlabeled_batch_size=2"]  # fmt: skip
    with pytest.raises(TypeError, match=r"the pseudo-label rule tests\.test_method\..*Broken\(\) returned a list"):
        train(demo_recipe(overrides), pseudo_label_rule=Broken())
