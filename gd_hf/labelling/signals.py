"""What the teacher's outputs on one unlabeled image say about labelling it: per-image signals from the
per-query outputs (`Predictions`) of its plain view and of a photometrically perturbed one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gd_hf.models.protocol import Predictions

THUMBNAIL = 8  # the near-duplicate embedding: the image at 8 x 8, grey (~0.4 kB a line in signals.jsonl)


@dataclass
class ImageSignals:
    """One image's signals (all in [0, inf); larger = more worth labelling, but `classes` and `thumbnail`)."""

    image_id: int
    near_threshold: float  # score mass of object queries just under the pseudo-label threshold
    entropy: float  # the largest normalised class entropy among its object queries
    disagreement: float | None  # 1 - agreement of the plain and perturbed views' pseudo labels (None: not run)
    classes: list[int] = field(default_factory=list)  # classes the teacher sees (score >= threshold / 2)
    thumbnail: list[float] = field(default_factory=list)  # unit vector, mean removed: cosine = dot product

    def as_dict(self) -> dict:
        rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        return rounded


def _object_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor, min_soft_area: float):
    """Per query: class probabilities, top score, top class and whether it is an object (not "no object", a mask
    of some area), as the pseudo-label rules read a query."""
    probabilities = class_logits.float().softmax(-1)
    scores, labels = probabilities.max(-1)
    soft_area = mask_logits.float().sigmoid().flatten(1).sum(-1)
    is_object = (labels != class_logits.shape[-1] - 1) & (soft_area > min_soft_area)
    return probabilities, scores, labels, is_object


def _views_agreement(weak: Predictions, strong: Predictions, i: int, threshold: float, min_soft_area: float) -> float:
    """Greedy one-to-one matching of the two views' pseudo labels (same class, by mask IoU): the matched IoU
    summed over the larger count; 1 when neither view has one."""
    kept = []
    for view in (weak, strong):
        _, scores, labels, is_object = _object_queries(view.class_logits[i], view.mask_logits[i], min_soft_area)
        keep = is_object & (scores > threshold)
        kept.append((labels[keep], view.mask_logits[i][keep].sigmoid() > 0.5))
    (labels_a, masks_a), (labels_b, masks_b) = kept
    if len(labels_a) == 0 and len(labels_b) == 0:
        return 1.0
    if len(labels_a) == 0 or len(labels_b) == 0:
        return 0.0
    a, b = masks_a.flatten(1).float(), masks_b.flatten(1).float()
    intersection = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - intersection
    iou = torch.where(labels_a[:, None] == labels_b[None, :], intersection / union.clamp(min=1), 0.0)
    total = 0.0
    while iou.numel() and iou.max() > 0:
        best = int(iou.argmax())
        row, column = divmod(best, iou.shape[1])
        total += float(iou[row, column])
        iou[row, :] = 0
        iou[:, column] = 0
    return total / max(len(labels_a), len(labels_b))


def thumbnail(image: torch.Tensor) -> list[float]:
    """A uint8 (3, H, W) image as a unit vector (8 x 8 grey, its mean removed; 3 decimals): near-duplicates
    score ~1, as perceptual hashes compare images."""
    grey = image.float().mean(0, keepdim=True)[None]
    small = torch.nn.functional.interpolate(grey, size=(THUMBNAIL, THUMBNAIL), mode="area").flatten()
    small = small - small.mean()
    norm = small.norm()
    return [round(v, 3) for v in (small / norm if norm > 0 else small).tolist()]


def image_signals(
    image_ids: list[int],
    weak: Predictions,
    strong: Predictions | None,
    threshold: float,
    min_soft_area: float,
    thumbnails: list[list[float]],
) -> list[ImageSignals]:
    """The signals of a batch: `weak` the teacher's outputs on the plain views, `strong` on the perturbed ones
    (None: no disagreement signal). `threshold`: the pseudo-label score threshold the run trains with."""
    signals = []
    classes = weak.class_logits.shape[-1] - 1
    for i, image_id in enumerate(image_ids):
        probabilities, scores, labels, is_object = _object_queries(weak.class_logits[i], weak.mask_logits[i],
                                                                   min_soft_area)  # fmt: skip
        under = is_object & (scores >= threshold / 2) & (scores < threshold)
        entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(-1) / torch.log(
            torch.tensor(float(classes + 1))
        )
        seen = is_object & (scores >= threshold / 2)
        signals.append(
            ImageSignals(
                image_id=int(image_id),
                near_threshold=float(scores[under].sum()),
                entropy=float(entropy[is_object].max()) if is_object.any() else 0.0,
                disagreement=None
                if strong is None
                else 1.0 - _views_agreement(weak, strong, i, threshold, min_soft_area),
                classes=sorted({int(c) for c in labels[seen]}),
                thumbnail=thumbnails[i],
            )
        )
    return signals
