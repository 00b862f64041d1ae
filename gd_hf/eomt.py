"""EoMT ("Your ViT is Secretly an Image Segmentation Model", Kerssies et al., CVPR 2025) as a model family of
Guided Distillation (`model.family: eomt`): building it (`build_eomt`), the `gd_hf.method.ModelFamily` protocol
for transformers' `EomtForUniversalSegmentation` (`EomtFamily`), and its mask-annealing schedule as a pure
function of the step (`MaskAnnealing`). What it settles, each tested (`tests/test_eomt.py`):

- EoMT's forward returns the last layer's predictions only, while its loss (the reference's and transformers')
  is the matched loss of every masked block's prediction plus the last one: `EomtFamily.forward` records each
  call of the model's `predict` during the pass, so the auxiliary predictions reach the method's loss as
  Mask2Former's do, and the two (labeled rows, strong rows) are computed from one forward pass.
- The query blocks train with masked attention, annealed away block by block (`attn_mask_probs` from 1 to 0);
  the loop writes the schedule's values before every step (`EomtFamily.start_step`), so a resume anneals as an
  uninterrupted run. In eval mode a probability strictly between 0 and 1 un-masks *random* queries, so nothing
  here ever predicts with one: `predict` (evaluation, exports) runs with every probability at 0, as EoMT at
  inference; the teacher predicts with 0 or 1 per block (`teacher_masks`), and the EMA never averages the buffer
  (`gd_hf.teacher.SCHEDULED_BUFFERS`).
- The position embeddings do not interpolate: every input must be exactly `image_size` square. Padding each
  side up to a multiple of `image_size` (`padding_divisor`) makes every frame `image_size` square, as the recipe
  checks keep crops and the evaluation size at most `image_size`; the padding is black (`black_padding`), as
  `EomtImageProcessor` pads before normalising, so evaluation feeds the model what the export's processor does.
- A DINOv2 backbone's ViT loads into EoMT's (`load_dinov2_weights`): the same layer names but `o_proj` ->
  `out_proj`; DINOv2 adds a position embedding to its [CLS] token and EoMT does not, so that embedding is folded
  into EoMT's [CLS] token; the patch position embeddings are resampled (bicubic) when the grids differ, and a
  patch embedding of another patch size is resampled as FlexiViT does (the EoMT reference: DINOv2's 14 -> 16).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, EomtConfig, EomtForUniversalSegmentation
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

from gd_hf.config import ModelConfig
from gd_hf.method import Predictions
from gd_hf.modeling import ModelLoadError, loading_named, loss_terms

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class MaskAnnealing:
    """The query blocks' masked-attention schedule of one phase: block k anneals from `starts[k]` to `ends[k]`."""

    starts: list[int]
    ends: list[int]
    power: float = MASK_ANNEALING_POWER

    @classmethod
    def from_recipe(cls, model: ModelConfig, max_steps: int, blocks: int) -> MaskAnnealing:
        """`model.eomt_mask_annealing` = [from, to] (fractions of the phase's `max_steps`) split into one equal
        span per block, one after another (the reference: 2 epochs per block from epoch 2 to 10 of 12)."""
        begin, end = model.eomt_mask_annealing
        bounds = [round((begin + (end - begin) * k / blocks) * max_steps) for k in range(blocks + 1)]
        starts = bounds[:-1]
        return cls(starts, [max(stop, start + 1) for start, stop in zip(starts, bounds[1:])])

    def probabilities(self, step: int) -> list[float]:
        return mask_probabilities(step, self.starts, self.ends, self.power)


@contextlib.contextmanager
def without_masked_attention(model: EomtForUniversalSegmentation) -> Iterator[None]:
    """Every masked-attention probability at 0 for the duration (EoMT as at inference: no masks, no random
    un-masking), then the buffer as it was."""
    buffer = model.attn_mask_probs
    kept = buffer.clone()
    with torch.no_grad():
        buffer.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            buffer.copy_(kept)


def set_mask_probabilities(model: EomtForUniversalSegmentation, probabilities: list[float]) -> None:
    """Write the schedule's probabilities into the model's `attn_mask_probs` buffer (in place)."""
    buffer = model.attn_mask_probs
    if len(probabilities) != buffer.numel():
        raise ValueError(f"the model has {buffer.numel()} masked blocks, the schedule {len(probabilities)}")
    with torch.no_grad():
        buffer.copy_(torch.tensor(probabilities, dtype=buffer.dtype, device=buffer.device))


@dataclass
class EomtFamily:
    """EoMT as Guided Distillation uses it (the `gd_hf.method.ModelFamily` protocol). `annealing`: the phase's
    schedule (None: the model's probabilities are left as they are, e.g. to predict with an export);
    `teacher_masks`: how the EMA teacher predicts (`model.eomt_teacher_masks`)."""

    annealing: MaskAnnealing | None = None
    teacher_masks: Literal["follow", "none"] = "follow"
    # EomtImageProcessor pads the image before normalising it, as the EoMT reference: black, everywhere.
    black_padding: ClassVar[bool] = True

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
        class_labels: list[torch.Tensor], *, no_object_weight: float | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        # EoMT's criterion takes the auxiliary predictions as Mask2Former's does (one matching per layer).
        return loss_terms(model, predictions, mask_labels, class_labels, no_object_weight)

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return model.config.image_size

    def predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        with without_masked_attention(model):  # as at inference, and so no random un-masking
            outputs = model(pixel_values=pixel_values)
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits)

    def teacher_predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        probabilities = model.attn_mask_probs
        if bool(((probabilities != 0) & (probabilities != 1)).any()):  # start_step writes 0 or 1 only
            raise ValueError(f"the teacher's masked-attention probabilities {probabilities.tolist()} are not 0 or 1: "
                             "in eval mode EoMT would un-mask random queries")  # fmt: skip
        outputs = model(pixel_values=pixel_values)
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits)

    def start_step(
        self, step: int, phase: str, student: torch.nn.Module, teacher: torch.nn.Module | None
    ) -> dict[str, float]:
        if self.annealing is None:
            return {}
        probabilities = self.annealing.probabilities(step)
        set_mask_probabilities(student, probabilities)
        figures = {f"mask_prob/block_{k}": p for k, p in enumerate(probabilities)}
        if teacher is not None:
            teacher_probabilities = self.teacher_probabilities(phase, probabilities)
            set_mask_probabilities(teacher, teacher_probabilities)
            figures["teacher_masked_blocks"] = sum(teacher_probabilities)
        return figures

    def teacher_probabilities(self, phase: str, student_probabilities: list[float]) -> list[float]:
        """The teacher's masking (0 or 1 per block): the fixed burn-in teacher finished its own annealing and
        predicts as at inference; the EMA teacher, with `follow`, masks the blocks the student still mostly trains
        masked (probability >= 0.5), as the weights it averages were trained."""
        if phase == "ema" and self.teacher_masks == "follow":
            return [1.0 if p >= 0.5 else 0.0 for p in student_probabilities]
        return [0.0] * len(student_probabilities)

    def load_pretrained(self, path: str) -> torch.nn.Module:
        return EomtForUniversalSegmentation.from_pretrained(path)


LOSS_SETTINGS = ("train_num_points", "no_object_weight", "class_weight", "mask_weight", "dice_weight")


def build_eomt(cfg: ModelConfig, id2label: dict[int, str]) -> EomtForUniversalSegmentation:
    """The EoMT of a recipe (`model.family: eomt`) for the classes `id2label`: from the recipe's sizes (random
    init), from a DINOv2 checkpoint (its ViT; the queries, the upscaling blocks and the heads start fresh), or from
    a whole EoMT checkpoint (re-headed for these classes, with the recipe's loss settings)."""
    labels = {
        "id2label": {int(k): v for k, v in id2label.items()},
        "label2id": {v: int(k) for k, v in id2label.items()},
    }
    settings = {key: getattr(cfg, key) for key in LOSS_SETTINGS} | {"num_queries": cfg.num_queries}
    if cfg.pretrained is None:
        config = EomtConfig(hidden_size=cfg.eomt_hidden_size, num_hidden_layers=cfg.eomt_layers,
                            num_attention_heads=cfg.eomt_heads, image_size=cfg.eomt_image_size,
                            patch_size=cfg.eomt_patch_size, num_blocks=cfg.eomt_query_blocks,
                            num_register_tokens=cfg.eomt_register_tokens, **settings, **labels)  # fmt: skip
        return EomtForUniversalSegmentation(config)
    with loading_named(cfg.pretrained):
        pretrained_config = AutoConfig.from_pretrained(cfg.pretrained)
    if pretrained_config.model_type == "eomt":
        return _load_eomt_checkpoint(cfg, labels, settings)
    if pretrained_config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ModelLoadError(
            f"model.pretrained={cfg.pretrained!r} is a {pretrained_config.model_type!r} model; model.family eomt "
            "starts from a DINOv2 checkpoint (facebook/dinov2-*, facebook/dinov2-with-registers-*) or an EoMT one"
        )
    if cfg.eomt_query_blocks > pretrained_config.num_hidden_layers:
        raise ModelLoadError(f"model.eomt_query_blocks={cfg.eomt_query_blocks} exceeds the "
                             f"{pretrained_config.num_hidden_layers} layers of {cfg.pretrained!r}")  # fmt: skip
    vit = {key: getattr(pretrained_config, key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
           "mlp_ratio", "hidden_act", "layer_norm_eps", "layerscale_value", "use_swiglu_ffn")}  # fmt: skip
    config = EomtConfig(**vit, num_register_tokens=getattr(pretrained_config, "num_register_tokens", 0),
                        image_size=cfg.eomt_image_size, patch_size=cfg.eomt_patch_size,
                        num_blocks=cfg.eomt_query_blocks, **settings, **labels)  # fmt: skip
    model = EomtForUniversalSegmentation(config)
    with loading_named(cfg.pretrained):
        # The concrete class (AutoModel maps the config's model_type), loaded from the folder or the HF cache.
        dinov2 = AutoModel.from_pretrained(cfg.pretrained)
        load_dinov2_weights(model, dinov2)
    logger.info("loaded the ViT of %s into EoMT", cfg.pretrained)
    return model


def _load_eomt_checkpoint(cfg: ModelConfig, labels: dict, settings: dict) -> EomtForUniversalSegmentation:
    with loading_named(cfg.pretrained):
        model = EomtForUniversalSegmentation.from_pretrained(cfg.pretrained, **labels, ignore_mismatched_sizes=True)
    config = model.config
    recipe_sizes = {"image_size": cfg.eomt_image_size, "patch_size": cfg.eomt_patch_size,
                    "num_blocks": cfg.eomt_query_blocks, "num_queries": cfg.num_queries}  # fmt: skip
    keys = {"image_size": "eomt_image_size", "patch_size": "eomt_patch_size", "num_blocks": "eomt_query_blocks",
            "num_queries": "num_queries"}  # fmt: skip
    differ = [f"model.{keys[k]}={v} (the checkpoint: {getattr(config, k)})" for k, v in recipe_sizes.items()
              if getattr(config, k) != v]  # fmt: skip
    if differ:
        raise ModelLoadError(f"model.pretrained={cfg.pretrained!r} is an EoMT of other sizes: set {', '.join(differ)}")
    # New classes mean a new classifier, even when the class count happens to match the checkpoint's.
    model.class_predictor.reset_parameters()
    for key in LOSS_SETTINGS:  # the loss settings are the recipe's, not the checkpoint's
        setattr(config, key, settings[key])
    model.weight_dict = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight,
                         "loss_dice": cfg.dice_weight}  # fmt: skip
    model.criterion = type(model.criterion)(config=config, weight_dict=model.weight_dict)
    set_mask_probabilities(model, [1.0] * config.num_blocks)  # a new training starts with masked attention
    return model


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
    patches = source["embeddings.patch_embeddings.projection.weight"]  # (D, 3, p, p)
    patch_size = model.config.patch_size
    if patches.shape[-1] != patch_size:
        mapped["embeddings.patch_embeddings.projection.weight"] = resample_patch_embedding(patches, patch_size)
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


def resample_patch_embedding(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A patch embedding's kernels (D, C, p, p) for another patch size, by FlexiViT's pseudo-inverse resize (what
    the EoMT reference's timm backbone does to DINOv2's 14-px kernels): the new kernel applied to a patch resized
    bicubically to the new size gives, in the least-squares sense, what the old kernel gave on the old patch."""
    old = weight.shape[-1]
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resize = F.interpolate(basis, size=(patch_size, patch_size), mode="bicubic", antialias=True, align_corners=False)
    resize = resize.reshape(old * old, patch_size * patch_size)  # row i: old basis patch i, resized
    pinv = torch.linalg.pinv(resize)  # (new*new, old*old)
    flat = weight.double().reshape(-1, old * old)
    return (flat @ pinv.T).reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


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


def eomt_image_processor(image_size: int) -> EomtImageProcessorPil:
    """The image processor an EoMT export ships: the longer side resized to `image_size` and the image padded to
    `image_size` square (`do_pad`), the only input EoMT's fixed position table takes (a 128x160 image through a
    128-px processor without padding fails in the embeddings)."""
    return EomtImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": image_size}, do_pad=True)
