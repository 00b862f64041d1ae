"""Teacher outputs -> pseudo labels for the student (the four rules of Guided Distillation, plus an optional
duplicate filter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PseudoLabels:
    """Per image: hard masks (N_i, h, w) as float and class ids (N_i,), plus each kept query's score.
    `small_masks` (monitoring; None for a rule that does not count them): per image, how many queries passed the
    class, score and soft-area rules with a hard mask below `filter_pseudo_labels`' `min_mask_pixels` (at least 1:
    an empty one), dropped when that rule is on, kept as "this class, no pixels" targets when it is off."""

    mask_labels: list[torch.Tensor]
    class_labels: list[torch.Tensor]
    scores: list[torch.Tensor]
    small_masks: list[int] | None = None

    def counts(self) -> list[int]:
        return [len(c) for c in self.class_labels]


@torch.no_grad()
def filter_pseudo_labels(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    score_threshold: float = 0.7,
    min_soft_area: float = 5.0,
    mask_threshold: float = 0.5,
    max_overlap: float | None = None,
    min_mask_pixels: int = 0,
) -> PseudoLabels:
    """Keep the teacher's confident, non-empty, non-"no object" queries as hard targets.

    class_logits: (B, Q, C+1), the last class being "no object"; mask_logits: (B, Q, h, w).
    1. drop queries whose arg-max class is "no object";
    2. keep those whose softmax max probability > `score_threshold`;
    3. keep those whose soft mask area (sum of sigmoid over the mask logits) > `min_soft_area` pixels;
    4. target class = arg-max, target mask = sigmoid(mask logit) > `mask_threshold`.
    Optionally (not in the paper, 0 = off): 4b. drop those whose hard mask has fewer than `min_mask_pixels`
    pixels. The soft-area rule (3) passes a query whose many pixels sit just under `mask_threshold`: its hard mask
    is then empty or a few pixels, and it teaches "this class, no pixels". They are counted either way
    (`PseudoLabels.small_masks`).
    Optionally (not in the paper, `None` = off): 5. going down by score, drop a pseudo label whose mask IoU with
    one already kept exceeds `max_overlap` (mask NMS). Mask2Former has no NMS, so a teacher that fires two
    queries on one object hands the student two targets for it, the student learns to fire twice, and an EMA
    teacher feeds that back (`pseudo_label_quality`'s `fp_duplicate` shows it).
    Masks stay at the teacher's mask resolution: the loss samples points in normalised coordinates.
    An image may end with no pseudo label; the loss then pushes all its queries to "no object".
    """
    no_object = class_logits.shape[-1] - 1
    probabilities = class_logits.float().softmax(-1)
    scores, labels = probabilities.max(-1)  # (B, Q)
    mask_probabilities = mask_logits.float().sigmoid()
    soft_area = mask_probabilities.flatten(2).sum(-1)  # (B, Q)
    keep = (labels != no_object) & (scores > score_threshold) & (soft_area > min_soft_area)
    masks, classes, kept_scores, small = [], [], [], []
    for i in range(class_logits.shape[0]):
        hard = mask_probabilities[i, keep[i]] > mask_threshold
        image_classes, image_scores = labels[i, keep[i]], scores[i, keep[i]]
        too_small = hard.flatten(1).sum(-1) < max(min_mask_pixels, 1)
        small.append(int(too_small.sum()))
        if min_mask_pixels > 0:
            hard, image_classes, image_scores = hard[~too_small], image_classes[~too_small], image_scores[~too_small]
        if max_overlap is not None and len(image_scores) > 1:
            kept = _non_overlapping(hard, image_scores, max_overlap)
            hard, image_classes, image_scores = hard[kept], image_classes[kept], image_scores[kept]
        masks.append(hard.float())
        classes.append(image_classes)
        kept_scores.append(image_scores)
    return PseudoLabels(masks, classes, kept_scores, small)


def _non_overlapping(masks: torch.Tensor, scores: torch.Tensor, max_overlap: float) -> torch.Tensor:
    """Indices (in score order) of the masks that overlap no higher-scoring kept mask by IoU > `max_overlap`."""
    order = scores.argsort(descending=True)
    flat = masks[order].flatten(1).float()
    intersection = flat @ flat.T
    area = flat.sum(-1)
    iou = intersection / (area[:, None] + area[None] - intersection).clamp(min=1)
    kept: list[int] = []
    for j in range(len(order)):  # at most the number of queries (100): a Python loop is fine
        if not kept or float(iou[j, kept].max()) <= max_overlap:
            kept.append(j)
    return order[kept]


@torch.no_grad()
def pseudo_label_counts(
    pseudo: PseudoLabels, true_masks: list[torch.Tensor], true_classes: list[torch.Tensor], iou_threshold: float = 0.5
) -> dict[str, int]:
    """Pseudo labels matched against known objects (hidden labels of synthetic data, ablations, or the val split for
    `gd_hf.method.teacher_check`): how many there are, how many objects, how many are right, what the wrong ones are.

    A pseudo label is correct when it has the class of a not-yet-matched true object and mask IoU >=
    `iou_threshold` with it (greedy by score). True masks are resized to the pseudo labels' resolution. Each
    wrong one is counted once, as the first of: `fp_duplicate` (a second label on an object already matched),
    `fp_wrong_class` (on an object, wrong class), `fp_mislocated` (overlaps an object, IoU in [0.1,
    `iou_threshold`)), `fp_background` (on nothing).
    """
    counts = dict.fromkeys(("pseudo_labels", "objects", "correct"), 0)
    wrong = dict.fromkeys(("duplicate", "wrong_class", "mislocated", "background"), 0)
    for masks, classes, scores, gt_masks, gt_classes in zip(
        pseudo.mask_labels, pseudo.class_labels, pseudo.scores, true_masks, true_classes
    ):
        counts["pseudo_labels"] += len(classes)
        counts["objects"] += len(gt_classes)
        if not len(classes):
            continue
        if not len(gt_classes):
            wrong["background"] += len(classes)
            continue
        gt = torch.nn.functional.interpolate(gt_masks[None].float(), size=masks.shape[-2:], mode="nearest")[0] > 0.5
        pred = masks > 0.5
        intersection = (pred[:, None] & gt[None]).flatten(2).sum(-1).float()
        union = (pred[:, None] | gt[None]).flatten(2).sum(-1).float().clamp(min=1)
        overlap = intersection / union  # (P, G), class-agnostic
        same_class = classes[:, None] == gt_classes[None].to(classes.device)
        iou = torch.where(same_class, overlap, torch.zeros_like(overlap))
        matched = torch.zeros(len(gt_classes), dtype=torch.bool)
        for p in scores.argsort(descending=True).tolist():
            candidates = iou[p].clone()
            candidates[matched] = 0
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                matched[best] = True
                counts["correct"] += 1
            elif bool((iou[p][matched] >= iou_threshold).any()):
                wrong["duplicate"] += 1
            elif float(overlap[p].max()) >= iou_threshold:
                wrong["wrong_class"] += 1
            elif float(overlap[p].max()) >= 0.1:
                wrong["mislocated"] += 1
            else:
                wrong["background"] += 1
    return {**counts, **{f"fp_{kind}": n for kind, n in wrong.items()}}


def pseudo_label_quality(
    pseudo: PseudoLabels, true_masks: list[torch.Tensor], true_classes: list[torch.Tensor], iou_threshold: float = 0.5
) -> dict[str, float]:
    """`pseudo_label_counts` as fractions: precision, recall, and each kind of wrong label as a fraction of all
    pseudo labels (with `precision` they sum to 1). Which kind grows tells what a teacher's confirmation bias
    looks like."""
    counts = pseudo_label_counts(pseudo, true_masks, true_classes, iou_threshold)
    predicted, actual = counts["pseudo_labels"], counts["objects"]
    nan = float("nan")
    kinds = ("duplicate", "wrong_class", "mislocated", "background")
    return {
        "precision": counts["correct"] / predicted if predicted else nan,
        "recall": counts["correct"] / actual if actual else nan,
        **{f"fp_{kind}": counts[f"fp_{kind}"] / predicted if predicted else nan for kind in kinds},
    }
