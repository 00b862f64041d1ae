"""Phases 2-3 with a labeled and an unlabeled batch of different padded sizes (the paper's data path: mixed
image sizes, crops smaller than `crop_size`): every target must lie under its prediction.

The models here are "perfect predictors": their mask logits are the square drawn in their own input (channel 0
bright), at 1/4 of the input's resolution as Mask2Former's, and their classes are right. So a pseudo label is
the square the teacher saw, and a target is only right if the frame the model sees and the target's frame are
one and the same.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import gd_hf.models.common as model_common
from gd_hf.data.loading import collate_train, collate_unlabeled, pad_batch
from gd_hf.method import GuidedDistillation, one_frame
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models import build_model
from gd_hf.models.mask2former import Mask2FormerFamily
from gd_hf.run.optim import build_lr_scheduler, build_optimizer
from gd_hf.run.step import train_step

from .conftest import demo_recipe, tiny_overrides

LOGIT = 12.0
DIVISIBILITY = 32


def square_image(height: int, width: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 image that is black but for a red square at box = (top, left, bottom, right), and its mask."""
    top, left, bottom, right = box
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0, top:bottom, left:right] = 255
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[0, top:bottom, left:right] = True
    return image, mask


def labeled_batch(height: int, width: int, box) -> dict:
    image, mask = square_image(height, width, box)
    sample = {"image": image, "masks": mask, "classes": torch.tensor([0]), "image_id": 1}
    return collate_train([sample, sample], DIVISIBILITY)


def unlabeled_batch(height: int, width: int, box) -> dict:
    image, mask = square_image(height, width, box)
    sample = {"weak": image, "strong": image, "hidden_masks": mask, "hidden_classes": torch.tensor([0]), "image_id": 2}
    return collate_unlabeled([sample, sample], DIVISIBILITY)


def perfect_outputs(pixel_values: torch.Tensor, num_queries: int, num_classes: int, anchor: torch.Tensor):
    """Mask2Former-shaped outputs that segment and classify the bright square of each input exactly.

    Query 0: the square (class 0), the other queries: "no object". `anchor` (a parameter, times 0) gives the
    outputs a gradient path so that the training step can run backward.
    """
    batch, _, height, width = pixel_values.shape
    square = (pixel_values[:, 0] > 1.0).float()[:, None]  # normalised red 255 ~ 2.2, black ~ -2.1, padding 0
    coarse = F.avg_pool2d(square, 4)[:, 0] > 0.5  # (B, H/4, W/4), Mask2Former's mask resolution
    masks = torch.full((batch, num_queries, height // 4, width // 4), -LOGIT)
    masks[:, 0] = torch.where(coarse, LOGIT, -LOGIT)
    classes = torch.full((batch, num_queries, num_classes + 1), -LOGIT)
    classes[:, 0, 0] = LOGIT
    classes[:, 1:, -1] = LOGIT
    zero = anchor.sum() * 0
    masks, classes = masks + zero, classes + zero
    aux = [{"masks_queries_logits": masks, "class_queries_logits": classes} for _ in range(2)]
    return SimpleNamespace(masks_queries_logits=masks, class_queries_logits=classes, auxiliary_logits=aux)


@pytest.fixture
def setup(synthetic_root, tmp_path, monkeypatch):
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path))
    id2label = {0: "square", 1: "b", 2: "c", 3: "d"}
    torch.manual_seed(0)
    student = build_model(recipe.model, id2label)
    teacher_model = build_model(recipe.model, id2label)
    queries = recipe.model.num_queries
    anchor = next(student.parameters())
    seen = []  # (who, pixel_values) for every forward pass

    def student_forward(pixel_values, **_):
        seen.append(("student", pixel_values))
        return perfect_outputs(pixel_values, queries, len(id2label), anchor)

    def teacher_forward(pixel_values, **_):
        seen.append(("teacher", pixel_values))
        return perfect_outputs(pixel_values, queries, len(id2label), torch.zeros(()))

    monkeypatch.setattr(student, "forward", student_forward)
    monkeypatch.setattr(teacher_model, "forward", teacher_forward)
    teacher = EmaTeacher(teacher_model)
    targets = []  # (mask_labels, class_labels, frame of the predictions they are scored against)
    real_loss_terms = model_common.loss_terms

    def loss_spy(model, outputs, mask_labels, class_labels, no_object_weight=None):
        targets.append((mask_labels, class_labels, outputs.mask_logits.shape[-2:]))
        return real_loss_terms(model, outputs, mask_labels, class_labels, no_object_weight)

    monkeypatch.setattr(model_common, "loss_terms", loss_spy)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(student, recipe.train)
    scheduler = build_lr_scheduler(optimizer, recipe.train)
    ssl = dataclasses.replace(recipe.ssl, enabled=True, pseudo_label_score_threshold=0.7, pseudo_label_max_overlap=None)

    def step(labeled: dict, unlabeled: dict | None) -> dict[str, float]:
        seen.clear()
        targets.clear()
        torch.manual_seed(0)  # the loss samples points at random
        return train_step(
            student,
            [labeled],
            optimizer,
            scheduler,
            accelerator,
            0.0,
            GuidedDistillation(ssl, Mask2FormerFamily(), teacher),
            None if unlabeled is None else [unlabeled],
        ).logged

    return SimpleNamespace(step=step, seen=seen, targets=targets)


def square_in(frame: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the True pixels of a 2-D bool tensor."""
    rows, cols = frame.any(1).nonzero()[:, 0], frame.any(0).nonzero()[:, 0]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


# (labeled size, unlabeled size, labeled box, unlabeled box): each batch pads larger than the other in turn,
# also in one dimension only (non-square frames), as jittered crops of mixed-size images do.
CASES = [
    ((32, 32), (64, 96), (4, 8, 20, 24), (36, 12, 60, 44)),
    ((64, 96), (32, 32), (36, 12, 60, 44), (4, 8, 20, 24)),
    ((64, 32), (32, 64), (40, 4, 60, 28), (8, 36, 24, 60)),
]


@pytest.mark.parametrize(("labeled_size", "unlabeled_size", "labeled_box", "unlabeled_box"), CASES)
def test_targets_land_on_the_pixels_of_their_objects_in_the_prediction_frame(
    setup, labeled_size, unlabeled_size, labeled_box, unlabeled_box
):
    setup.step(labeled_batch(*labeled_size, labeled_box), unlabeled_batch(*unlabeled_size, unlabeled_box))
    (who_t, weak), (who_s, student_input) = setup.seen
    assert (who_t, who_s) == ("teacher", "student")
    frame = student_input.shape[-2:]
    assert tuple(frame) == (max(labeled_size[0], unlabeled_size[0]), max(labeled_size[1], unlabeled_size[1]))
    assert weak.shape[-2:] == frame  # the teacher sees the frame the student is trained in
    (labeled_masks, labeled_classes, pred_frame), (pseudo_masks, pseudo_classes, _) = setup.targets
    assert tuple(pred_frame) == (frame[0] // 4, frame[1] // 4)
    for masks, classes, rows, box in (
        (labeled_masks, labeled_classes, slice(0, 2), labeled_box),
        (pseudo_masks, pseudo_classes, slice(2, 4), unlabeled_box),
    ):
        for mask, image in zip(masks, student_input[rows]):
            assert mask.shape[0] == 1
            # Map the target onto the model's input frame as the loss does (normalised coordinates).
            on_input = F.interpolate(mask[None].float(), size=tuple(frame), mode="nearest")[0, 0] > 0.5
            assert square_in(on_input) == box
            assert square_in(image[0] > 1.0) == box  # and that is where the object is in the input
        assert [c.tolist() for c in classes] == [[0], [0]]


@pytest.mark.parametrize(("labeled_size", "unlabeled_size", "labeled_box", "unlabeled_box"), CASES)
def test_a_perfect_prediction_keeps_its_loss_when_the_other_batch_pads_larger(
    setup, labeled_size, unlabeled_size, labeled_box, unlabeled_box
):
    frame = (max(labeled_size[0], unlabeled_size[0]), max(labeled_size[1], unlabeled_size[1]))
    mixed = setup.step(labeled_batch(*labeled_size, labeled_box), unlabeled_batch(*unlabeled_size, unlabeled_box))
    # The reference: both images drawn at the frame's size, so no batch needs padding to meet the other. The
    # perfect models see the same square at the same pixels, so everything but the padding is the same.
    same_frame = setup.step(labeled_batch(*frame, labeled_box), unlabeled_batch(*frame, unlabeled_box))
    for key in ("loss_sup", "loss_unsup", "loss_mask", "loss_dice", "loss_cross_entropy"):
        assert mixed[key] == pytest.approx(same_frame[key], rel=1e-5, abs=1e-6), key
    # ~0 for a perfect prediction: what is left is the point sampling at the square's soft edges (the BCE of a
    # target of 0.5 is at least ln 2); a target off its object costs far more (a miss gives dice ~1 x 5).
    assert mixed["loss_dice"] < 1.0 and mixed["loss_cross_entropy"] < 1e-3
    assert mixed["pseudo_labels_per_image"] == 1
    assert mixed["pseudo_precision"] == 1.0  # against the hidden masks, padded alike


def test_pad_batch_pads_images_and_their_masks_together():
    box = (4, 8, 20, 24)
    labeled = labeled_batch(32, 32, box)
    padded = pad_batch(labeled, 64, 96)
    assert padded["pixel_values"].shape[-2:] == (64, 96)
    assert all(m.shape[-2:] == (64, 96) for m in padded["mask_labels"])
    assert square_in(padded["mask_labels"][0][0] > 0.5) == box
    unlabeled = unlabeled_batch(64, 32, (4, 4, 28, 28))
    a, b = one_frame(labeled, unlabeled)
    assert a["pixel_values"].shape[-2:] == b["weak_pixel_values"].shape[-2:] == b["strong_pixel_values"].shape[-2:]
    assert a["pixel_values"].shape[-2:] == (64, 32)
    assert all(m.shape[-2:] == (64, 32) for m in b["hidden_masks"])
    assert pad_batch(labeled, 32, 32) is labeled
