"""What the teacher's outputs on one unlabeled image say about labelling it: per-image signals from the
per-query outputs (`Predictions`) of its plain view and of a photometrically perturbed one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gd_hf.method.pseudo_labels import filter_pseudo_labels
from gd_hf.models.protocol import Predictions

THUMBNAIL = 8  # the near-duplicate embedding: the image at 8 x 8, grey, in [0, 1] (~0.4 kB a line of signals.jsonl)


@dataclass
class ImageSignals:
    """One image's signals (all in [0, inf); larger = more worth labelling, but `classes` and `thumbnail`)."""

    image_id: int
    near_threshold: float  # score mass of object queries just under the pseudo-label threshold
    entropy: float  # the largest normalised class entropy among the object queries it sees (score >= t / 2)
    disagreement: float | None  # 1 - agreement of the plain and perturbed views' pseudo labels (None: not run)
    classes: list[int] = field(default_factory=list)  # classes the teacher sees (score >= threshold / 2)
    thumbnail: list[float] = field(default_factory=list)  # 8 x 8 grey levels in [0, 1]

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


def _views_agreement(
    weak: Predictions, strong: Predictions, i: int, threshold: float, min_soft_area: float, mask_threshold: float
) -> float:
    """Greedy one-to-one matching of the two views' pseudo labels (the method's rules, those whose hard mask is
    empty left out; same class, by mask IoU): the matched IoU summed over the larger count; 1 when neither view
    has one."""
    (labels_a, masks_a), (labels_b, masks_b) = [
        (pseudo.class_labels[0], pseudo.mask_labels[0].bool())
        for view in (weak, strong)
        for pseudo in [
            filter_pseudo_labels(
                view.class_logits[i : i + 1],
                view.mask_logits[i : i + 1],
                threshold,
                min_soft_area,
                mask_threshold,
                min_mask_pixels=1,
            )
        ]  # fmt: skip
    ]
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
    """A uint8 (3, H, W) image at 8 x 8, grey, in [0, 1] (3 decimals): two images whose thumbnails differ by a few
    grey levels (RMS) are near-duplicates, flat frames included."""
    grey = image.float().mean(0, keepdim=True)[None] / 255.0
    small = torch.nn.functional.interpolate(grey, size=(THUMBNAIL, THUMBNAIL), mode="area").flatten()
    return [round(v, 3) for v in small.tolist()]


def image_signals(
    image_ids: list[int],
    weak: Predictions,
    strong: Predictions | None,
    threshold: float,
    min_soft_area: float,
    thumbnails: list[list[float]],
    mask_threshold: float = 0.5,
) -> list[ImageSignals]:
    """The signals of a batch: `weak` the teacher's outputs on the plain views, `strong` on the perturbed ones
    (None: no disagreement signal). `threshold`, `min_soft_area`, `mask_threshold`: the run's pseudo-label rules.
    Values are rounded as `signals.jsonl` stores them, so a resumed pass ranks as an uninterrupted one."""
    signals = []
    classes = weak.class_logits.shape[-1] - 1
    for i, image_id in enumerate(image_ids):
        probabilities, scores, labels, is_object = _object_queries(weak.class_logits[i], weak.mask_logits[i],
                                                                   min_soft_area)  # fmt: skip
        under = is_object & (scores >= threshold / 2) & (scores < threshold)
        seen = is_object & (scores >= threshold / 2)  # (not the near-uniform queries every image has)
        entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(-1) / torch.log(
            torch.tensor(float(classes + 1))
        )
        agreement = None if strong is None else _views_agreement(weak, strong, i, threshold, min_soft_area,
                                                                 mask_threshold)  # fmt: skip
        signal = ImageSignals(
            image_id=int(image_id),
            near_threshold=float(scores[under].sum()),
            entropy=float(entropy[seen].max()) if seen.any() else 0.0,
            disagreement=None if agreement is None else 1.0 - agreement,
            classes=sorted({int(c) for c in labels[seen]}),
            thumbnail=thumbnails[i],
        )
        signals.append(ImageSignals(**signal.as_dict()))
    return signals
