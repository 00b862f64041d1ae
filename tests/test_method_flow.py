"""What flows through one Guided Distillation step (`train_step`), spied on with a real tiny Mask2Former: which
view reaches the teacher and which the student, that hidden labels never become targets, and that the
backpropagated loss is L_sup + w * L_unsup."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import gd_hf.models.common as model_common
from gd_hf.data.loading import collate_train, collate_unlabeled
from gd_hf.method import GuidedDistillation
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models import build_model
from gd_hf.models.mask2former import Mask2FormerFamily
from gd_hf.run.optim import build_lr_scheduler, build_optimizer
from gd_hf.run.step import train_step

from .conftest import demo_recipe, tiny_overrides

DIVISIBILITY = 32
ID2LABEL = {0: "a", 1: "b", 2: "c", 3: "d"}


def rectangles(seed: int, count: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uint8 image of `count` coloured rectangles on noise, their masks and classes."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 60, (3, height, width), generator=generator, dtype=torch.uint8)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    for k in range(count):
        top, left = int(torch.randint(0, height // 2, (1,), generator=generator)), k * width // count
        masks[k, top : top + height // 3, left + 2 : left + width // count - 2] = True
        image[:, masks[k]] = torch.tensor([200, 40 * k, 255 - 50 * k], dtype=torch.uint8)[:, None]
    return image, masks, torch.arange(count) % len(ID2LABEL)


def batches(poison_hidden: bool = False) -> tuple[dict, dict]:
    """A labeled batch (48 x 64) and an unlabeled one (64 x 40: another padded frame) whose strong view is a
    different image from the weak one, so that the two can be told apart wherever they arrive."""
    labeled = []
    for seed in (1, 2):
        image, masks, classes = rectangles(seed, 2, 48, 64)
        labeled.append({"image": image, "masks": masks, "classes": classes, "image_id": seed})
    unlabeled = []
    for seed in (3, 4):
        weak, masks, classes = rectangles(seed, 3, 64, 40)
        strong = 255 - weak  # not a real strong augmentation: a view that cannot be mistaken for the weak one
        if poison_hidden:  # what the data set carries for monitoring only, replaced by nonsense
            masks = torch.ones_like(masks)
            classes = torch.full_like(classes, len(ID2LABEL) - 1)
        unlabeled.append(
            {"weak": weak, "strong": strong, "hidden_masks": masks, "hidden_classes": classes, "image_id": seed}
        )
    return collate_train(labeled, DIVISIBILITY), collate_unlabeled(unlabeled, DIVISIBILITY)


@pytest.fixture
def step_runner(synthetic_root, tmp_path, monkeypatch):
    """Runs one `train_step` from the same student, teacher, optimizer state and random state every time,
    recording every forward input, every target scored, and the gradients the optimizer steps with."""
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    torch.manual_seed(0)
    student0 = build_model(recipe.model, ID2LABEL)
    teacher_model = build_model(recipe.model, ID2LABEL)
    record = SimpleNamespace(inputs=[], targets=[], grads=None)

    real_loss_terms = model_common.loss_terms

    def loss_spy(model, outputs, mask_labels, class_labels, no_object_weight=None):
        record.targets.append(([m.clone() for m in mask_labels], [c.clone() for c in class_labels]))
        return real_loss_terms(model, outputs, mask_labels, class_labels, no_object_weight)

    monkeypatch.setattr(model_common, "loss_terms", loss_spy)

    def run(poison_hidden: bool = False, unsup_loss_weight: float = 1.0) -> tuple[dict, torch.nn.Module]:
        student = copy.deepcopy(student0)
        teacher = EmaTeacher(copy.deepcopy(teacher_model))
        for who, module in (("student", student), ("teacher", teacher.model)):
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, who=who: record.inputs.append((who, kwargs["pixel_values"].clone())),
                with_kwargs=True,
            )
        optimizer = build_optimizer(student, recipe.train)

        def record_grads(*_):  # just before the update: the gradients it steps with
            record.grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]

        optimizer.register_step_pre_hook(record_grads)
        ssl = dataclasses.replace(
            recipe.ssl,
            enabled=True,
            unsup_loss_weight=unsup_loss_weight,
            pseudo_label_score_threshold=0.0,  # a random-init teacher: keep every query it ranks above no-object
            pseudo_label_min_area=1,
        )
        record.inputs.clear()
        record.targets.clear()
        labeled, unlabeled = batches(poison_hidden)
        torch.manual_seed(0)  # the loss samples points at random: the same points in every run
        logged = train_step(
            student,
            [labeled],
            optimizer,
            build_lr_scheduler(optimizer, recipe.train),
            Accelerator(cpu=True),
            0.0,
            GuidedDistillation(ssl, Mask2FormerFamily(), teacher),
            [unlabeled],
        ).logged
        return logged, student

    return SimpleNamespace(run=run, record=record)


def test_the_teacher_gets_the_weak_view_and_the_student_the_strong_one(step_runner):
    step_runner.run()
    inputs = step_runner.record.inputs
    assert [who for who, _ in inputs] == ["teacher", "student"]
    teacher_input, student_input = inputs[0][1], inputs[1][1]
    labeled, unlabeled = batches()
    # One frame for everything (the larger of 48x64 and 64x40, padded to 32): 64 x 64.
    assert teacher_input.shape == (2, 3, 64, 64) and student_input.shape == (4, 3, 64, 64)
    weak, strong = unlabeled["weak_pixel_values"], unlabeled["strong_pixel_values"]
    assert torch.equal(teacher_input[..., : weak.shape[-2], : weak.shape[-1]], weak)  # the weak view, exactly
    assert torch.equal(student_input[2:, :, : strong.shape[-2], : strong.shape[-1]], strong)  # the strong view
    assert torch.equal(student_input[:2, :, :48, :64], labeled["pixel_values"][..., :48, :64])  # labeled first
    assert not torch.equal(weak, strong)


def test_hidden_labels_never_become_targets(step_runner):
    """The monitoring labels the unlabeled set carries are poisoned: loss, gradients and updated weights stay
    bitwise the same, while the monitoring figures (which do read them) change."""
    clean_log, clean_student = step_runner.run()
    clean_grads, clean_targets = step_runner.record.grads, step_runner.record.targets
    poisoned_log, poisoned_student = step_runner.run(poison_hidden=True)
    assert poisoned_log["loss"] == clean_log["loss"]
    assert all(torch.equal(a, b) for a, b in zip(clean_grads, step_runner.record.grads))
    assert all(torch.equal(a, b) for a, b in zip(clean_student.parameters(), poisoned_student.parameters()))
    # The pseudo labels (second loss call) are the teacher's, not the hidden ones, in both runs.
    (_, (pseudo_masks, pseudo_classes)) = step_runner.record.targets
    assert [len(m) for m in pseudo_masks] == [len(m) for m in clean_targets[1][0]]
    assert not any(m.all() for masks in pseudo_masks for m in masks)  # never the all-ones poisoned masks
    # ... and the poison did arrive where hidden labels belong: the pseudo-label quality figures moved.
    monitoring = ("pseudo_fp_background", "pseudo_fp_mislocated")
    assert [clean_log[k] for k in monitoring] != [poisoned_log[k] for k in monitoring]


def test_the_backpropagated_loss_is_sup_plus_weight_times_unsup(step_runner):
    """Gradients for weight w equal g_sup + w * g_unsup, with g_sup from w = 0 and g_unsup from w = 1 - w = 0:
    the weight reaches the backward pass, not only the logged sum."""
    step_runner.run(unsup_loss_weight=0.0)
    g_sup = step_runner.record.grads
    step_runner.run(unsup_loss_weight=1.0)
    g_unsup = [one - sup for one, sup in zip(step_runner.record.grads, g_sup)]
    assert max(float(g.abs().max()) for g in g_unsup) > 1e-4  # the unsupervised term has a gradient of its own
    step_runner.run(unsup_loss_weight=0.3)
    for got, sup, unsup in zip(step_runner.record.grads, g_sup, g_unsup):
        expected = sup + 0.3 * unsup
        # Float rounding only: gradients of a random-init model reach 1e6, so the tolerance scales with each.
        torch.testing.assert_close(got, expected, atol=1e-6 * float(expected.abs().max()) + 1e-7, rtol=1e-5)
