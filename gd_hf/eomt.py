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
- A DINOv2 backbone's ViT loads into EoMT's (`load_dinov2_weights`): the same layer names but `o_proj` ->
  `out_proj`; DINOv2 adds a position embedding to its [CLS] token and EoMT does not, so that embedding is folded
  into EoMT's [CLS] token; the patch position embeddings are resampled (bicubic) when the grids differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import EomtForUniversalSegmentation, EomtImageProcessor

from gd_hf.method import Predictions
from gd_hf.modeling import Mask2FormerFamily

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

    # EoMT's criterion takes the auxiliary predictions as Mask2Former's does (one matching per layer).
    loss = Mask2FormerFamily.loss

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


def load_dinov2_weights(model: EomtForUniversalSegmentation, dinov2: torch.nn.Module) -> None:
    """Copy the ViT of a DINOv2 model (`Dinov2Model` or `Dinov2WithRegistersModel`: patch embedding, [CLS] and
    register tokens, position embeddings, every layer, the final norm) into EoMT's; the queries, the mask head, the
    upscaling blocks and the classifier keep their fresh weights. Raises `ValueError` naming what does not fit."""
    source = dinov2.state_dict()
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        if name.startswith("encoder.layer."):
            mapped[
                "layers." + name.removeprefix("encoder.layer.").replace("attention.o_proj", "attention.out_proj")
            ] = tensor
        elif name.startswith(("layernorm.", "embeddings.patch_embeddings.", "embeddings.register_tokens")):
            mapped[name] = tensor
    positions = source["embeddings.position_embeddings"]  # (1, 1 + n*n, D): [CLS] first
    mapped["embeddings.cls_token"] = source["embeddings.cls_token"] + positions[:, :1]
    mapped["embeddings.position_embeddings.weight"] = _resampled_grid(
        positions[0, 1:], model.embeddings.position_embeddings.num_embeddings
    )
    unknown = sorted(set(mapped) - set(target))
    mismatched = sorted(k for k in set(mapped) & set(target) if mapped[k].shape != target[k].shape)
    if unknown or mismatched:
        raise ValueError(
            f"the DINOv2 weights do not fit this EoMT: names it lacks {unknown[:5]}, other shapes {mismatched[:5]} "
            "(hidden size, layer count, patch size and register tokens must match the checkpoint's)"
        )
    missing = sorted(
        k for k in target if k.startswith(("layers.", "embeddings.")) and k not in mapped and target[k].numel()
    )  # (an EoMT without register tokens has an empty `register_tokens`)
    if missing:
        raise ValueError(f"the DINOv2 checkpoint has no weights for EoMT's {missing[:5]}")
    model.load_state_dict(mapped, strict=False)


def _resampled_grid(positions: torch.Tensor, count: int) -> torch.Tensor:
    """Patch position embeddings (n*n, D) as (m*m, D) with m*m = `count` (bicubic on the grid, as DINOv2's own
    interpolation)."""
    n, m = math.isqrt(positions.shape[0]), math.isqrt(count)
    if n * n != positions.shape[0] or m * m != count:
        raise ValueError(f"position embeddings of {positions.shape[0]} and {count} patches are not square grids")
    if n == m:
        return positions
    grid = positions.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
    return resampled.permute(0, 2, 3, 1).reshape(m * m, -1).to(positions.dtype)


def eomt_image_processor(image_size: int) -> EomtImageProcessor:
    """The image processor an EoMT export ships: the longer side resized to `image_size` and the image padded to
    `image_size` square (`do_pad`), the only input EoMT's fixed position table takes (a 128x160 image through a
    128-px processor without padding fails in the embeddings)."""
    return EomtImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size}, do_pad=True)


def prepare_for_export(model: EomtForUniversalSegmentation) -> None:
    """An exported EoMT predicts as at inference: no masked attention, so no random un-masking (`attn_mask_probs`
    is saved in `model.safetensors`, and the training loop's value would ship otherwise)."""
    set_mask_probabilities(model, [0.0] * model.attn_mask_probs.numel())
