"""Mask2Former (transformers' `Mask2FormerForUniversalSegmentation`) on a Swin / DINOv2 / ResNet AutoBackbone,
as a model family of Guided Distillation (`model.family: mask2former`, the default): `Mask2FormerFamily`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from transformers import (
    AutoConfig,
    Dinov2Config,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    PreTrainedModel,
    ResNetConfig,
    SwinConfig,
)
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from gd_hf.config import DataConfig, ModelConfig, Recipe
from gd_hf.models import common
from gd_hf.models.common import ModelLoadError, loading_named
from gd_hf.models.protocol import Check, FamilyCard, Predictions

logger = logging.getLogger(__name__)

# The model_type values of each backbone family, as they appear in a hub config.json.
BACKBONE_MODEL_TYPES = {"swin": ("swin",), "dinov2": ("dinov2", "dinov2_with_registers"), "resnet": ("resnet",)}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def dinov2_feature_layers(num_layers: int, layers: list[int] | None) -> list[int]:
    """The DINOv2 layers fed to the pixel decoder: 4 evenly spaced ones ending with the last, unless given.

    Why intermediate layers: vanilla transformers' Dinov2Backbone returns every map at the patch stride (14), so
    the decoder's four "scales" differ only by depth. Taking 4 depths (like ViTDet / ViT-Adapter) gives the
    multi-scale deformable decoder distinct inputs, while the checkpoint stays a plain `Dinov2Backbone` that
    `from_pretrained` loads with no custom code (the reference's strided resize of the last layer would not be).
    """
    if layers is None:
        step = num_layers / 4
        return [round(step * (i + 1)) for i in range(4)]
    if not layers or any(not 1 <= i <= num_layers for i in layers):
        raise ModelLoadError(f"model.dinov2_feature_layers={layers}: layers must lie in 1..{num_layers}")
    return list(layers)


def _backbone_config_from_sizes(cfg: ModelConfig) -> AutoConfig:
    if cfg.backbone == "swin":
        return SwinConfig(
            embed_dim=cfg.backbone_hidden_size,
            depths=cfg.backbone_depths,
            num_heads=cfg.backbone_num_heads,
            window_size=7,
            drop_path_rate=0.3 if sum(cfg.backbone_depths) > 8 else 0.0,
            out_features=STAGES,
        )
    if cfg.backbone == "dinov2":
        num_layers = sum(cfg.backbone_depths)
        return Dinov2Config(
            hidden_size=cfg.backbone_hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=cfg.backbone_num_heads[-1],
            intermediate_size=4 * cfg.backbone_hidden_size,
            patch_size=14,
            image_size=518,
            out_indices=dinov2_feature_layers(num_layers, cfg.dinov2_feature_layers),
            reshape_hidden_states=True,
        )
    # Random-init ResNet uses basic blocks (cheap at tiny sizes); start from microsoft/resnet-50 for the R50.
    return ResNetConfig(
        embedding_size=cfg.backbone_hidden_size,
        hidden_sizes=[cfg.backbone_hidden_size * 2**i for i in range(4)],
        depths=cfg.backbone_depths,
        layer_type="basic",
        out_features=STAGES,
    )


def _set_backbone_outputs(backbone_config, cfg: ModelConfig) -> None:
    if cfg.backbone == "dinov2":
        layers = dinov2_feature_layers(backbone_config.num_hidden_layers, cfg.dinov2_feature_layers)
        backbone_config.out_indices = layers
        backbone_config.out_features = [f"stage{i}" for i in layers]
        backbone_config.reshape_hidden_states = True
    else:
        backbone_config.out_features = STAGES
        backbone_config.out_indices = [1, 2, 3, 4]


def _mask2former_config(cfg: ModelConfig, backbone_config, id2label: dict[int, str]) -> Mask2FormerConfig:
    return Mask2FormerConfig(
        backbone_config=backbone_config,
        feature_size=cfg.hidden_dim,
        mask_feature_size=cfg.hidden_dim,
        hidden_dim=cfg.hidden_dim,
        encoder_feedforward_dim=4 * cfg.hidden_dim,
        dim_feedforward=8 * cfg.hidden_dim,
        num_attention_heads=max(1, cfg.hidden_dim // 32),
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        num_queries=cfg.num_queries,
        train_num_points=cfg.train_num_points,
        no_object_weight=cfg.no_object_weight,
        class_weight=cfg.class_weight,
        mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight,
        **common.labels(id2label),
    )


def build_mask2former(cfg: ModelConfig, id2label: dict[int, str]) -> Mask2FormerForUniversalSegmentation:
    """The Mask2Former of a recipe: from its sizes (random init), on a pretrained backbone, or a whole Mask2Former
    checkpoint re-headed for these classes."""
    if cfg.pretrained is None:
        model = Mask2FormerForUniversalSegmentation(
            _mask2former_config(cfg, _backbone_config_from_sizes(cfg), id2label)
        )
        if cfg.backbone == "swin":
            give_padding_a_nonzero_embedding(model)
    else:
        pretrained_config = common.pretrained_config(cfg.pretrained)
        if pretrained_config.model_type == "mask2former":
            model = _load_mask2former_checkpoint(cfg, id2label)
        else:
            model = _build_with_pretrained_backbone(cfg, pretrained_config, id2label)
    common.use_mean_mask_count_across_processes(model)
    return model


def give_padding_a_nonzero_embedding(model: Mask2FormerForUniversalSegmentation) -> None:
    """Draw the bias of a random-init Swin's patch embedding like its weights (normal, `initializer_range`).

    transformers initialises it to 0, and Swin has no absolute position embedding, so a zero-padded patch (every
    batch of mixed-size crops has some) embeds to an exact zero vector; a LayerNorm over a zero vector scales its
    gradient by 1/sqrt(eps), and the first step's gradient norm was ~1e8 on a half-padded tiny batch (1e18 at
    Swin-T sizes) against ~10 unpadded. A non-zero constant token normalises like any other. Pretrained weights
    have non-zero biases already.
    """
    encoder = model.model.pixel_level_module.encoder
    projection = encoder.swin.embeddings.patch_embeddings.projection
    with torch.no_grad():
        projection.bias.normal_(0.0, encoder.config.initializer_range)


def _build_with_pretrained_backbone(cfg: ModelConfig, backbone_config, id2label) -> Mask2FormerForUniversalSegmentation:
    if backbone_config.model_type not in BACKBONE_MODEL_TYPES[cfg.backbone]:
        raise ModelLoadError(
            f"model.pretrained={cfg.pretrained!r} is a {backbone_config.model_type!r} model but model.backbone is "
            f"{cfg.backbone!r}: set model.backbone to match or choose another checkpoint"
        )
    if hasattr(backbone_config, "stage_names"):  # a classification config: make it a backbone config
        _set_backbone_outputs(backbone_config, cfg)
    model = Mask2FormerForUniversalSegmentation(_mask2former_config(cfg, backbone_config, id2label))
    # Mask2FormerConfig always builds its backbone with random weights (hf-notes): load them explicitly.
    encoder = model.model.pixel_level_module.encoder
    # The concrete class (SwinBackbone, ...), not AutoBackbone: AutoBackbone.from_pretrained asks the hub whether
    # the repo exists (a network call even for a local folder) before loading.
    with loading_named(cfg.pretrained):
        pretrained = type(encoder).from_pretrained(cfg.pretrained, config=encoder.config)
    missing, unexpected = encoder.load_state_dict(pretrained.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"backbone weights of {cfg.pretrained!r} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    logger.info("loaded backbone weights from %s", cfg.pretrained)
    return model


def _load_mask2former_checkpoint(cfg: ModelConfig, id2label) -> Mask2FormerForUniversalSegmentation:
    with loading_named(cfg.pretrained):
        model = Mask2FormerForUniversalSegmentation.from_pretrained(
            cfg.pretrained, **common.labels(id2label), ignore_mismatched_sizes=True
        )
    backbone_type = model.config.backbone_config.model_type
    if backbone_type not in BACKBONE_MODEL_TYPES[cfg.backbone]:
        raise ModelLoadError(
            f"model.pretrained={cfg.pretrained!r} has a {backbone_type!r} backbone but model.backbone is {cfg.backbone!r}"
        )
    common.rehead(model, cfg)
    return model


def padding_divisor(model: Mask2FormerForUniversalSegmentation) -> int:
    """Input sides must be multiples of this: the patch size for DINOv2, the coarsest stride (32) otherwise."""
    backbone_config = model.config.backbone_config
    if backbone_config.model_type.startswith("dinov2"):
        return backbone_config.patch_size
    return 32


def build_image_processor(
    model: Mask2FormerForUniversalSegmentation,
    data: DataConfig,
    divisor: int | None = None,  # (its padding divisor)
) -> Mask2FormerImageProcessorPil:
    """The image processor saved with every export: the same resize, padding divisor (None: `padding_divisor`)
    and normalisation as our evaluation."""
    return Mask2FormerImageProcessorPil(
        size={"shortest_edge": data.eval_shortest_edge, "longest_edge": data.eval_longest_edge},
        size_divisor=divisor if divisor is not None else padding_divisor(model),
        ignore_index=255,
        do_reduce_labels=False,
    )


def _heads_problem(m: ModelConfig) -> str | None:
    """Why the attention heads do not fit the backbone's widths (random init only), or None."""
    if m.pretrained is not None or not m.backbone_num_heads or min(m.backbone_num_heads) <= 0:
        return None
    if m.backbone == "swin":
        if len(m.backbone_num_heads) != 4:
            return "must list 4 stages for Swin"
        widths = [m.backbone_hidden_size * 2**i for i in range(4)]
        if any(w % h for w, h in zip(widths, m.backbone_num_heads)):
            return f"must divide each Swin stage's width {widths}"
    if m.backbone == "dinov2" and m.backbone_hidden_size % m.backbone_num_heads[-1]:
        return f"(its last entry) must divide model.backbone_hidden_size {m.backbone_hidden_size}"
    return None


class Mask2FormerFamily:
    """Mask2Former (any AutoBackbone) as gd_hf trains it (the `gd_hf.models.protocol.ModelFamily` protocol)."""

    name = "mask2former"
    display_name = "Mask2Former"
    black_padding = False  # its image processor pads after normalising: the mean colour
    scheduled_buffers: tuple[str, ...] = ()

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Mask2FormerFamily:
        return cls()

    # -- what the method calls ------------------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        outputs = model(pixel_values=pixel_values, output_auxiliary_logits=True)
        auxiliary = [(aux["class_queries_logits"], aux["masks_queries_logits"]) for aux in outputs.auxiliary_logits]
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits, auxiliary)

    def loss(
        self, model: torch.nn.Module, predictions: Predictions, mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor], *, no_object_weight: float | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        return common.loss_terms(model, predictions, mask_labels, class_labels, no_object_weight)

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return padding_divisor(model)

    def predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        # Mask2Former predicts the same in eval mode whatever the step: nothing to switch off.
        outputs = model(pixel_values=pixel_values)
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits)

    def teacher_predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        return self.predict(model, pixel_values)

    def start_step(
        self, step: int, phase: str, student: torch.nn.Module, teacher: torch.nn.Module | None
    ) -> dict[str, float]:
        return {}  # nothing scheduled by the step beyond the method's own

    def load_pretrained(self, path: str) -> torch.nn.Module:
        return Mask2FormerForUniversalSegmentation.from_pretrained(path)

    # -- what a run calls around the method -----------------------------------------------------------------------

    def recipe_problems(self, recipe: Recipe) -> list[Check]:
        """The backbone's sizes and heads, the decoders' width and depths; no layer-wise lr decay."""
        m = recipe.model
        return [
            (m.backbone_hidden_size > 0, "model.backbone_hidden_size", "must be > 0"),
            (all(v > 0 for v in m.backbone_depths), "model.backbone_depths", "must all be > 0"),
            (
                bool(m.backbone_num_heads) and all(v > 0 for v in m.backbone_num_heads),
                "model.backbone_num_heads",
                "must all be > 0",
            ),  # fmt: skip
            (
                m.hidden_dim > 0 and m.hidden_dim % 32 == 0,
                "model.hidden_dim",
                "must be a positive multiple of 32 (the pixel decoder's GroupNorm has 32 groups)",
            ),  # fmt: skip
            (_heads_problem(m) is None, "model.backbone_num_heads", _heads_problem(m) or ""),
            (m.encoder_layers > 0, "model.encoder_layers", "must be > 0"),
            (m.decoder_layers > 0, "model.decoder_layers", "must be > 0"),
            (len(m.backbone_depths) == 4, "model.backbone_depths", "must list 4 stages"),
            (
                recipe.train.layer_lr_decay == 1,
                "train.layer_lr_decay",
                "applies to EoMT's ViT only (model.family: eomt); Mask2Former's backbone learns at "
                "train.backbone_lr_multiplier",
            ),
        ]

    def build_model(self, cfg: ModelConfig, id2label: dict[int, str]) -> PreTrainedModel:
        return build_mask2former(cfg, id2label)

    def image_processor(self, model: PreTrainedModel, data: DataConfig, padding_divisor: int) -> object:
        return build_image_processor(model, data, padding_divisor)

    def lr_scale(self, model: torch.nn.Module, name: str, layer_lr_decay: float) -> float | None:
        return 1.0 if ".pixel_level_module.encoder." in f".{name}" else None  # its AutoBackbone, factor 1

    def exported(self, model: PreTrainedModel) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # trained as it predicts

    def input_size_problem(self, model: PreTrainedModel, shortest_edge: int, longest_edge: int) -> str | None:
        return None  # any size (padded to `padding_divisor`)

    def card(self, cfg: ModelConfig, pretrained: str | None) -> FamilyCard:
        backbone = pretrained or (
            f"{cfg.backbone} from scratch (hidden {cfg.backbone_hidden_size}, depths {cfg.backbone_depths})"
        )
        return FamilyCard("Mask2FormerForUniversalSegmentation",
                          f"Mask2Former ({cfg.num_queries} queries, {cfg.decoder_layers} decoder layers, hidden "
                          f"size {cfg.hidden_dim}), backbone: {backbone}",
                          tuple(f.name for f in dataclasses.fields(cfg) if f.name.startswith("eomt_")))  # fmt: skip

    def usage_snippet(self, load: str, imports: str, image_path: str) -> str:
        return f"""```python
{imports}from PIL import Image
from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, pipeline

image_path = {image_path}

# 1. pipeline: one dict per instance (label, score, PIL mask of the image's size)
segmenter = pipeline("image-segmentation", model={load})
instances = segmenter(image_path, subtask="instance", threshold=0.5)
print([(i["label"], round(i["score"], 3)) for i in instances])

# 2. model + image processor
processor = AutoImageProcessor.from_pretrained({load})
model = Mask2FormerForUniversalSegmentation.from_pretrained({load})
image = Image.open(image_path).convert("RGB")
outputs = model(**processor(images=image, return_tensors="pt"))
result = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=[image.size[::-1]])[0]
print(result["segmentation"].shape, [model.config.id2label[s["label_id"]] for s in result["segments_info"]])
```"""
