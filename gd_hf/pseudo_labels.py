"""Teacher outputs -> pseudo labels for the student (the four rules of Guided Distillation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PseudoLabels:
    """Per image: hard masks (N_i, h, w) as float and class ids (N_i,), plus each kept query's score."""

    mask_labels: list[torch.Tensor]
    class_labels: list[torch.Tensor]
    scores: list[torch.Tensor]

    def counts(self) -> list[int]:
        return [len(c) for c in self.class_labels]


@torch.no_grad()
def filter_pseudo_labels(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    score_threshold: float = 0.7,
    min_soft_area: float = 5.0,
    mask_threshold: float = 0.5,
) -> PseudoLabels:
    """Keep the teacher's confident, non-empty, non-"no object" queries as hard targets.

    class_logits: (B, Q, C+1), the last class being "no object"; mask_logits: (B, Q, h, w).
    1. drop queries whose arg-max class is "no object";
    2. keep those whose softmax max probability > `score_threshold`;
    3. keep those whose soft mask area (sum of sigmoid over the mask logits) > `min_soft_area` pixels;
    4. target class = arg-max, target mask = sigmoid(mask logit) > `mask_threshold`.
    Masks stay at the teacher's mask resolution: the loss samples points in normalised coordinates.
    An image may end with no pseudo label; the loss then pushes all its queries to "no object".
    """
    no_object = class_logits.shape[-1] - 1
    probabilities = class_logits.float().softmax(-1)
    scores, labels = probabilities.max(-1)  # (B, Q)
    mask_probabilities = mask_logits.float().sigmoid()
    soft_area = mask_probabilities.flatten(2).sum(-1)  # (B, Q)
    keep = (labels != no_object) & (scores > score_threshold) & (soft_area > min_soft_area)
    masks, classes, kept_scores = [], [], []
    for i in range(class_logits.shape[0]):
        masks.append((mask_probabilities[i, keep[i]] > mask_threshold).float())
        classes.append(labels[i, keep[i]])
        kept_scores.append(scores[i, keep[i]])
    return PseudoLabels(masks, classes, kept_scores)


@torch.no_grad()
def pseudo_label_quality(
    pseudo: PseudoLabels, true_masks: list[torch.Tensor], true_classes: list[torch.Tensor], iou_threshold: float = 0.5
) -> dict[str, float]:
    """Precision/recall of pseudo labels against hidden ground truth (synthetic data, ablations).

    A pseudo label is correct when it has the class of a not-yet-matched true object and mask IoU >=
    `iou_threshold` with it (greedy by score). True masks are resized to the pseudo labels' resolution.
    """
    true_positives = predicted = actual = 0
    for masks, classes, scores, gt_masks, gt_classes in zip(
        pseudo.mask_labels, pseudo.class_labels, pseudo.scores, true_masks, true_classes
    ):
        predicted += len(classes)
        actual += len(gt_classes)
        if not len(classes) or not len(gt_classes):
            continue
        gt = torch.nn.functional.interpolate(gt_masks[None].float(), size=masks.shape[-2:], mode="nearest")[0] > 0.5
        pred = masks > 0.5
        intersection = (pred[:, None] & gt[None]).flatten(2).sum(-1).float()
        union = (pred[:, None] | gt[None]).flatten(2).sum(-1).float().clamp(min=1)
        iou = intersection / union  # (P, G)
        iou[classes[:, None] != gt_classes[None].to(classes.device)] = 0
        matched = torch.zeros(len(gt_classes), dtype=torch.bool)
        for p in scores.argsort(descending=True).tolist():
            candidates = iou[p].clone()
            candidates[matched] = 0
            best = int(candidates.argmax())
            if candidates[best] >= iou_threshold:
                matched[best] = True
                true_positives += 1
    return {
        "precision": true_positives / predicted if predicted else float("nan"),
        "recall": true_positives / actual if actual else float("nan"),
    }
