"""EoMT ("Your ViT is Secretly an Image Segmentation Model", Kerssies et al., CVPR 2025) as a model family of
Guided Distillation (`model.family: eomt`): building it (`build_eomt`), the `gd_hf.models.protocol.ModelFamily`
protocol for transformers' `EomtForUniversalSegmentation` (`EomtFamily`), and its mask-annealing schedule as a
pure function of the step (`MaskAnnealing`). What it settles, each tested (`tests/test_eomt.py`):

- EoMT's forward returns the last layer's predictions only, while its loss (the reference's and transformers')
  is the matched loss of every masked block's prediction plus the last one: `EomtFamily.forward` records each
  call of the model's `predict` during the pass, so the auxiliary predictions reach the method's loss as
  Mask2Former's do, and the two (labeled rows, strong rows) are computed from one forward pass.
- The query blocks train with masked attention, annealed away block by block (`attn_mask_probs` from 1 to 0);
  the loop writes the schedule's values before every step (`EomtFamily.start_step`), so a resume anneals as an
  uninterrupted run. In eval mode a probability strictly between 0 and 1 un-masks *random* queries, so nothing
  here ever predicts with one: `predict` (evaluation, exports) runs with every probability at 0, as EoMT at
  inference; the teacher predicts with 0 or 1 per block (`teacher_masks`), and the EMA never averages the buffer
  (`EomtFamily.scheduled_buffers`).
- The position embeddings do not interpolate: every input must be exactly `image_size` square. Padding each
  side up to a multiple of `image_size` (`padding_divisor`) makes every frame `image_size` square, as the recipe
  checks keep crops and the evaluation size at most `image_size`; the padding is black (`black_padding`), as
  `EomtImageProcessor` pads before normalising, so evaluation feeds the model what the export's processor does.
- A DINOv2 backbone's ViT loads into EoMT's (`gd_hf.models.vit_weights.load_dinov2_weights`): the same layer names but `o_proj` ->
  `out_proj`; DINOv2 adds a position embedding to its [CLS] token and EoMT does not, so that embedding is folded
  into EoMT's [CLS] token; the patch position embeddings are resampled (bicubic) when the grids differ, and a
  patch embedding of another patch size is resampled as FlexiViT does (the EoMT reference: DINOv2's 14 -> 16).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from transformers import AutoModel, EomtConfig, EomtForUniversalSegmentation, PreTrainedModel
from transformers.models.eomt.image_processing_pil_eomt import EomtImageProcessorPil

from gd_hf.config import DataConfig, ModelConfig, Recipe
from gd_hf.models import common
from gd_hf.models.common import LOSS_SETTINGS, ModelLoadError, loading_named
from gd_hf.models.protocol import Check, FamilyCard, Predictions
from gd_hf.models.vit_weights import load_dinov2_weights

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
    """EoMT as gd_hf trains it (the `gd_hf.models.protocol.ModelFamily` protocol). `annealing`: the phase's
    schedule (None: the model's probabilities are left as they are, e.g. to predict with an export);
    `teacher_masks`: how the EMA teacher predicts (`model.eomt_teacher_masks`)."""

    annealing: MaskAnnealing | None = None
    teacher_masks: Literal["follow", "none"] = "follow"
    name: ClassVar[str] = "eomt"
    display_name: ClassVar[str] = "EoMT"
    # EomtImageProcessor pads the image before normalising it, as the EoMT reference: black, everywhere.
    black_padding: ClassVar[bool] = True
    # The masked-attention probabilities, written by `start_step`: an EMA average of them would be a value
    # strictly between 0 and 1, which in eval mode un-masks random queries.
    scheduled_buffers: ClassVar[tuple[str, ...]] = ("attn_mask_probs",)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> EomtFamily:
        """The family of a phase of `recipe` (the annealing spans that phase's `train.max_steps`)."""
        model = recipe.model
        annealing = MaskAnnealing.from_recipe(model, recipe.train.max_steps, model.eomt_query_blocks)
        return cls(annealing, model.eomt_teacher_masks)

    # -- what the method calls ------------------------------------------------------------------------------------

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
        return common.loss_terms(model, predictions, mask_labels, class_labels, no_object_weight)

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

    # -- what a run calls around the method -----------------------------------------------------------------------

    def recipe_problems(self, recipe: Recipe) -> list[Check]:
        """EoMT's fixed square input, its query blocks and its mask-annealing span."""
        m, d = recipe.model, recipe.data
        side, annealing = m.eomt_image_size, m.eomt_mask_annealing
        return [
            (m.eomt_patch_size > 0, "model.eomt_patch_size", "must be > 0 (the EoMT reference: 16)"),
            (m.eomt_layers > 0, "model.eomt_layers", "must be > 0 (ViT-L: 24)"),
            (
                m.eomt_heads > 0 and m.eomt_hidden_size > 0 and m.eomt_hidden_size % m.eomt_heads == 0,
                "model.eomt_heads",
                f"must be > 0 and divide model.eomt_hidden_size {m.eomt_hidden_size} (ViT-L: 16 of 1024)",
            ),  # fmt: skip
            (
                side > 0 and side % max(1, m.eomt_patch_size) == 0,
                "model.eomt_image_size",
                f"must be a positive multiple of model.eomt_patch_size {m.eomt_patch_size} (the reference: 640)",
            ),  # fmt: skip
            (side <= 4096, "model.eomt_image_size", "must be <= 4096 (the reference: 640)"),
            (
                m.pretrained is not None or m.eomt_query_blocks <= m.eomt_layers,
                "model.eomt_query_blocks",
                f"must be at most model.eomt_layers {m.eomt_layers}",
            ),  # fmt: skip
            (m.eomt_query_blocks > 0, "model.eomt_query_blocks", "must be > 0 (the reference: 4)"),
            (m.eomt_register_tokens >= 0, "model.eomt_register_tokens", "must be >= 0"),
            (
                len(annealing) == 2 and 0 <= annealing[0] < annealing[1] <= 1,
                "model.eomt_mask_annealing",
                f"must be [from, to] with 0 <= from < to <= 1 (fractions of train.max_steps), got {annealing}",
            ),  # fmt: skip
            (
                d.crop_size <= side,
                "data.crop_size",
                f"must be <= model.eomt_image_size {side}: EoMT takes exactly that square (smaller crops are padded)",
            ),  # fmt: skip
            (
                d.eval_shortest_edge == d.eval_longest_edge == side,
                "data.eval_shortest_edge",
                f"and data.eval_longest_edge must both be model.eomt_image_size {side}: EoMT evaluates as its "
                f"export predicts (the longer side resized to it, padded square), got {d.eval_shortest_edge} and "
                f"{d.eval_longest_edge}",
            ),  # fmt: skip
        ]

    def build_model(self, cfg: ModelConfig, id2label: dict[int, str]) -> PreTrainedModel:
        model = build_eomt(cfg, id2label)
        common.use_mean_mask_count_across_processes(model)
        return model

    def image_processor(self, model: PreTrainedModel, data: DataConfig, padding_divisor: int) -> object:
        # The longer side resized to its `image_size` and padded square: the only input it takes.
        return eomt_image_processor(model.config.image_size)

    def lr_scale(self, model: torch.nn.Module, name: str, layer_lr_decay: float) -> float | None:
        """The ViT (embeddings, every block, the final norm) is the backbone, as in the EoMT reference, whose
        layer-wise decay gives block i of L (0-based) `decay ** (L - 1 - i)`, the embeddings (patch embedding,
        [CLS] and register tokens, position table) the first block's factor, the final norm 1; the queries,
        upscaling blocks and heads are the rest."""
        layers = model.config.num_hidden_layers
        if name.startswith("layers."):
            return layer_lr_decay ** (layers - 1 - int(name.split(".")[1]))
        if name.startswith("embeddings."):
            return layer_lr_decay ** (layers - 1)
        if name.startswith("layernorm."):
            return 1.0
        return None

    def exported(self, model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
        # Without masked attention: `attn_mask_probs` is saved in `model.safetensors`, and the training loop's
        # value would ship otherwise (in eval mode a value strictly between 0 and 1 un-masks random queries).
        return without_masked_attention(model)

    def input_size_problem(self, model: PreTrainedModel, shortest_edge: int, longest_edge: int) -> str | None:
        side = getattr(model.config, "image_size", None)
        if side is not None and max(shortest_edge, longest_edge) > side:
            return (f"this EoMT takes {side} x {side} inputs (its position embeddings do not interpolate): a "
                    f"test-time size of {shortest_edge}/{longest_edge} exceeds it")  # fmt: skip
        return None

    def card(self, cfg: ModelConfig, pretrained: str | None) -> FamilyCard:
        return FamilyCard("EomtForUniversalSegmentation",
                          f"EoMT ({cfg.num_queries} queries in the last {cfg.eomt_query_blocks} ViT blocks, "
                          f"{cfg.eomt_image_size} px square inputs, patch {cfg.eomt_patch_size}), ViT: "
                          + (pretrained or f"from scratch (hidden {cfg.eomt_hidden_size}, {cfg.eomt_layers} "
                             "layers)"), MASK2FORMER_ONLY_KEYS)  # fmt: skip

    def usage_snippet(self, load: str, imports: str, image_path: str) -> str:
        # transformers 5.24-5.25 (the newest checked): pipeline(subtask="instance") passes `mask_threshold`, which the
        # PIL backend's EomtImageProcessorPil.post_process_instance_segmentation does not take (a TypeError; the
        # torchvision backend drops it); the pipeline's default subtask runs the panoptic post-processing.
        return f"""```python
{imports}from PIL import Image
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

image_path = {image_path}

# 1. model + image processor: the queries above the threshold, each pixel given to one of them
processor = AutoImageProcessor.from_pretrained({load})
model = AutoModelForUniversalSegmentation.from_pretrained({load})  # an EomtForUniversalSegmentation
image = Image.open(image_path).convert("RGB")
outputs = model(**processor(images=image, return_tensors="pt"))
result = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=[image.size[::-1]])[0]
print(result["segmentation"].shape, [model.config.id2label[s["label_id"]] for s in result["segments_info"]])

# 2. pipeline, default subtask: one dict per segment (label, score, PIL mask), from EoMT's panoptic post-processing
# (segments do not overlap). subtask="instance" needs torchvision installed with transformers 5.24-5.25.
segmenter = pipeline("image-segmentation", model={load})
print([(s["label"], round(s["score"], 3)) for s in segmenter(image_path, threshold=0.5)])
```"""


# The `model.*` keys of Mask2Former and its backbones, which an EoMT never reads.
MASK2FORMER_ONLY_KEYS = ("backbone", "backbone_hidden_size", "backbone_depths", "backbone_num_heads",
                         "dinov2_feature_layers", "hidden_dim", "encoder_layers", "decoder_layers")  # fmt: skip


def build_eomt(cfg: ModelConfig, id2label: dict[int, str]) -> EomtForUniversalSegmentation:
    """The EoMT of a recipe (`model.family: eomt`) for the classes `id2label`: from the recipe's sizes (random
    init), from a DINOv2 checkpoint (its ViT; the queries, the upscaling blocks and the heads start fresh), or from
    a whole EoMT checkpoint (re-headed for these classes, with the recipe's loss settings)."""
    labels = common.labels(id2label)
    settings = {key: getattr(cfg, key) for key in LOSS_SETTINGS} | {"num_queries": cfg.num_queries}
    if cfg.pretrained is None:
        config = EomtConfig(hidden_size=cfg.eomt_hidden_size, num_hidden_layers=cfg.eomt_layers,
                            num_attention_heads=cfg.eomt_heads, image_size=cfg.eomt_image_size,
                            patch_size=cfg.eomt_patch_size, num_blocks=cfg.eomt_query_blocks,
                            num_register_tokens=cfg.eomt_register_tokens, **settings, **labels)  # fmt: skip
        return EomtForUniversalSegmentation(config)
    pretrained_config = common.pretrained_config(cfg.pretrained)
    if pretrained_config.model_type == "eomt":
        return _load_eomt_checkpoint(cfg, labels)
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


def _load_eomt_checkpoint(cfg: ModelConfig, labels: dict) -> EomtForUniversalSegmentation:
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
    common.rehead(model, cfg)
    set_mask_probabilities(model, [1.0] * config.num_blocks)  # a new training starts with masked attention
    return model


def eomt_image_processor(image_size: int) -> EomtImageProcessorPil:
    """The image processor an EoMT export ships: the longer side resized to `image_size` and the image padded to
    `image_size` square (`do_pad`), the only input EoMT's fixed position table takes (a 128x160 image through a
    128-px processor without padding fails in the embeddings)."""
    return EomtImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": image_size}, do_pad=True)
