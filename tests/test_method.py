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
from accelerate.state import AcceleratorState

from gd_hf.config import SslConfig, load_recipe
from gd_hf.method import GuidedDistillation, Predictions, PseudoLabelRules, one_frame
from gd_hf.modeling import Mask2FormerFamily, build_model, loss_terms
from gd_hf.pseudo_labels import PseudoLabels, filter_pseudo_labels
from gd_hf.teacher import EmaTeacher
from gd_hf.train import train

from .conftest import ONE_LAUNCH_SSL, ROOT, tiny_overrides
from .test_method_flow import ID2LABEL, batches


class RecordingFamily(Mask2FormerFamily):
    """Mask2Former, keeping the student's last predictions (what the loss is computed from)."""

    def forward(self, model, pixel_values):
        self.predictions = super().forward(model, pixel_values)
        return self.predictions


@pytest.fixture
def tiny(synthetic_root, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", tiny_overrides(synthetic_root, tmp_path))
    torch.manual_seed(0)
    student, teacher = build_model(recipe.model, ID2LABEL), build_model(recipe.model, ID2LABEL)
    student.eval()  # no dropout: the only random draws left are the loss's sampled points
    # A random-init teacher: keep every query it ranks above "no object".
    ssl = dataclasses.replace(recipe.ssl, enabled=True, unsup_loss_weight=2.5, pseudo_label_score_threshold=0.0,
                              pseudo_label_min_area=1)  # fmt: skip
    return SimpleNamespace(student=student, teacher=EmaTeacher(teacher), ssl=ssl)


def test_the_loss_is_the_supervised_loss_plus_the_weighted_unsupervised_loss(tiny):
    family = RecordingFamily()
    method = GuidedDistillation(tiny.ssl, family, tiny.teacher)
    labeled, unlabeled = batches()
    torch.manual_seed(1)
    loss, logged = method.loss(tiny.student, tiny.student, labeled, unlabeled)

    # By hand, from the same outputs: the teacher's pseudo labels on the weak view (in the common frame), then
    # the Mask2Former loss of the labeled rows and of the strong rows, with the same random points.
    labeled_framed, unlabeled_framed = one_frame(labeled, unlabeled)
    with torch.no_grad():
        teacher_out = tiny.teacher.model(pixel_values=unlabeled_framed["weak_pixel_values"])
    pseudo = filter_pseudo_labels(teacher_out.class_queries_logits, teacher_out.masks_queries_logits, 0.0, 1,
                                  tiny.ssl.pseudo_label_mask_threshold, tiny.ssl.pseudo_label_max_overlap)  # fmt: skip
    assert sum(pseudo.counts()) > 0
    outputs = family.predictions
    n = labeled["pixel_values"].shape[0]
    assert outputs.class_logits.shape[0] == n + unlabeled["strong_pixel_values"].shape[0]
    torch.manual_seed(1)
    l_sup = sum(loss_terms(tiny.student, outputs.rows(slice(0, n)), labeled_framed["mask_labels"],
                           labeled_framed["class_labels"]).values())  # fmt: skip
    l_unsup = sum(loss_terms(tiny.student, outputs.rows(slice(n, None)), pseudo.mask_labels,
                             pseudo.class_labels).values())  # fmt: skip
    assert torch.allclose(loss, l_sup + 2.5 * l_unsup, rtol=1e-6, atol=0)
    assert torch.allclose(logged["loss_sup"], l_sup) and torch.allclose(logged["loss_unsup"], l_unsup)
    assert float(l_unsup.detach()) > 0 and float(loss.detach()) > float(
        l_sup.detach()
    )  # the weight acts on a real term
    assert logged["pseudo_labels_per_image"] == sum(pseudo.counts()) / len(pseudo.counts())
    loss.backward()  # the loss backpropagates into the student and not into the teacher
    assert any(p.grad is not None for p in tiny.student.parameters())
    assert all(p.grad is None for p in tiny.teacher.model.parameters())


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
        assert not method.start_step(step, student)
        method.after_step(step, student, update_skipped=False)
        assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in frozen.items())
    assert method.start_step(2, student)  # the first EMA step: teacher <- student
    assert torch.equal(teacher.model.weight, student.weight)
    with torch.no_grad():
        student.weight.add_(1.0)
    before = teacher.model.weight.clone()
    method.after_step(2, student, update_skipped=True)  # a skipped update moves nothing
    assert torch.equal(teacher.model.weight, before)
    method.after_step(2, student, update_skipped=False)
    assert torch.allclose(teacher.model.weight, 0.5 * before + 0.5 * student.weight)
    assert not method.start_step(3, student)  # the copy happens once


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
    """The README's example rule: the recipe's rules, then only the `k` highest-scoring labels of each image."""

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
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides), **extension_points)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    train(
        load_recipe(
            ROOT / "recipes" / "demo_synthetic.yaml", tiny_overrides(synthetic_root, out) + ["train.max_steps=2"]
        )
    )
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
    assert "a custom pseudo-label rule" in (tmp_path / "top1" / "final" / "README.md").read_text()


class PaddedTo64(Mask2FormerFamily):
    """A custom family: Mask2Former whose inputs are padded to multiples of 64, counting what the method asks."""

    def __init__(self) -> None:
        self.calls = {"forward": [], "loss": 0, "predict": [], "load_pretrained": 0}

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return 64

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
    family = PaddedTo64()
    distill(synthetic_root, tmp_path / "run", teacher_dir, model_family=family)
    assert family.calls["load_pretrained"] == 1  # ssl.teacher, loaded by the family
    assert len(family.calls["forward"]) == 2 and family.calls["loss"] == 4  # two steps, L_sup and L_unsup each
    # The teacher check's and the method's teacher predictions, and every student input: multiples of 64.
    assert family.calls["predict"]
    for height, width in family.calls["forward"] + family.calls["predict"]:
        assert height % 64 == 0 and width % 64 == 0


def test_a_one_launch_run_runs_both_phases_on_one_accelerator_and_ends_it_once(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.distributed as distributed

    made, ended = [], []

    class CountingAccelerator(distributed.Accelerator):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

        def end_training(self):
            ended.append(1)
            super().end_training()

    monkeypatch.setattr(distributed, "Accelerator", CountingAccelerator)
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + ONE_LAUNCH_SSL + [
        "ssl.teacher_max_steps=2", "train.max_steps=2", "ssl.burn_in_steps=1", "train.checkpoint_every=2",
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides))
    assert made == [1] and ended == [1]
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
    """A custom rule is not a recipe key: the checkpoints record its class, and a relaunch that drops or swaps it
    changes what is trained."""
    from gd_hf.config import RecipeError

    out = tmp_path / "run"
    top_1 = TopKPerImage(1, PseudoLabelRules(score_threshold=0.0, min_soft_area=1))
    distill(synthetic_root, out, teacher_dir, pseudo_label_rule=top_1)
    trainer_state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert trainer_state["extension_points"] == {"pseudo_label_rule": "tests.test_method.TopKPerImage"}
    with pytest.raises(
        RecipeError, match=r"python:pseudo_label_rule: 'tests.test_method.TopKPerImage' -> \"the recipe's\""
    ):
        distill(synthetic_root, out, teacher_dir, "train.max_steps=3")
    logged = distill(synthetic_root, out, teacher_dir, "train.max_steps=3", pseudo_label_rule=top_1)  # the same: on
    assert [r["pseudo_labels_per_image"] for r in logged if "pseudo_labels_per_image" in r] == [1.0] * 3


def test_the_readme_example_rule_runs_as_written(monkeypatch):
    """The README's "Extending the method" example, executed: it passes a rule that keeps the top 3 per image."""
    import re

    import gd_hf.train as train_module

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Extending the method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in code.splitlines())  # list indent
    passed = {}
    monkeypatch.setattr(train_module, "train", lambda recipe, **kwargs: passed.update(kwargs))
    exec(compile(code, "README.md", "exec"), {})
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
