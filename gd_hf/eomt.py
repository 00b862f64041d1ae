"""EoMT ("Your ViT is Secretly an Image Segmentation Model", Kerssies et al., CVPR 2025) as a model family of
Guided Distillation: the `gd_hf.method.ModelFamily` protocol for transformers' `EomtForUniversalSegmentation`,
and its mask-annealing schedule as a pure function of the step.

Groundwork for issue 27: this module is not yet reachable from a recipe (`model.family` is not a recipe key yet);
what is missing is listed in the issue's note. What it settles, each tested (`tests/test_eomt.py`):

- EoMT's forward returns the last layer's predictions only, while its loss (the reference's and transformers')
  is the matched loss of every masked block's prediction plus the last one: `EomtFamily.forward` records each
  call of the model's `predict` during the pass, so the auxiliary predictions reach the method's loss as
  Mask2Former's do, and the two (labeled rows, strong rows) are computed from one forward pass.
- In eval mode a block's `attn_mask_probs` strictly between 0 and 1 un-masks *random* queries: `predict` runs
  with every probability at 0 (as at inference: no masked attention, no randomness) and puts the buffer back.
- The position embeddings do not interpolate: every input must be exactly `image_size` square. Padding each
  side up to a multiple of `image_size` (`padding_divisor`) makes every frame `image_size` square as long as crops
  and evaluation sizes are at most `image_size`.
"""

from __future__ import annotations

import torch
from transformers import EomtForUniversalSegmentation

from gd_hf.method import Predictions
from gd_hf.modeling import loss_terms

# The reference's annealing exponent (tue-mps/eomt, `poly_power`).
MASK_ANNEALING_POWER = 0.9


def mask_probabilities(
    step: int, starts: list[int], ends: list[int], power: float = MASK_ANNEALING_POWER
) -> list[float]:
    """The masked-attention probability of each masked block before optimizer step `step` (0-based): 1 before
    the block's start, 0 from its end, `(1 - progress) ** power` in between (the reference's `mask_annealing`).
    A pure function of the step, so a resumed run anneals exactly as an uninterrupted one."""
    if len(starts) != len(ends) or any(end <= start for start, end in zip(starts, ends)):
        raise ValueError(f"mask annealing needs one (start < end) pair per block, got starts {starts}, ends {ends}")
    probabilities = []
    for start, end in zip(starts, ends):
        if step < start:
            probabilities.append(1.0)
        elif step >= end:
            probabilities.append(0.0)
        else:
            probabilities.append((1.0 - (step - start) / (end - start)) ** power)
    return probabilities


def set_mask_probabilities(model: EomtForUniversalSegmentation, probabilities: list[float]) -> None:
    """Write the schedule's probabilities into the model's `attn_mask_probs` buffer (in place)."""
    buffer = model.attn_mask_probs
    if len(probabilities) != buffer.numel():
        raise ValueError(f"the model has {buffer.numel()} masked blocks, the schedule {len(probabilities)}")
    with torch.no_grad():
        buffer.copy_(torch.tensor(probabilities, dtype=buffer.dtype, device=buffer.device))


class EomtFamily:
    """EoMT as Guided Distillation uses it (the `gd_hf.method.ModelFamily` protocol)."""

    def forward(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mask logits, class logits) of each call
        predict = inner.predict

        def recording_predict(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            masks_and_classes = predict(hidden_states)
            per_layer.append(masks_and_classes)
            return masks_and_classes

        inner.predict = recording_predict  # an instance attribute for this one pass: the class's method stays
        try:
            model(pixel_values=pixel_values)
        finally:
            del inner.predict
        (masks, classes), auxiliary = per_layer[-1], per_layer[:-1]
        return Predictions(classes, masks, [(c, m) for m, c in auxiliary])

    def loss(
        self, model: torch.nn.Module, predictions: Predictions, mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        # EoMT's criterion takes the auxiliary predictions as Mask2Former's does (one matching per layer).
        return loss_terms(model, predictions, mask_labels, class_labels)

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return model.config.image_size

    def predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        probabilities = model.attn_mask_probs
        kept = probabilities.clone()
        probabilities.zero_()  # as at inference: no masked attention, and so no random un-masking
        try:
            outputs = model(pixel_values=pixel_values)
        finally:
            probabilities.copy_(kept)
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits)

    def load_pretrained(self, path: str) -> torch.nn.Module:
        return EomtForUniversalSegmentation.from_pretrained(path)
