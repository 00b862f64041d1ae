"""`build_model`: the one place a recipe's model is made (a Mask2Former with a Swin / DINOv2 / ResNet backbone, or
an EoMT through `gd_hf.eomt`), and `Mask2FormerFamily`."""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from pathlib import Path

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
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from gd_hf.config import DataConfig, ModelConfig, RecipeError
from gd_hf.method import Predictions

logger = logging.getLogger(__name__)

# The model_type values of each backbone family, as they appear in a hub config.json.
BACKBONE_MODEL_TYPES = {"swin": ("swin",), "dinov2": ("dinov2", "dinov2_with_registers"), "resnet": ("resnet",)}
STAGES = ["stage1", "stage2", "stage3", "stage4"]


class ModelLoadError(RecipeError):
    """`model.pretrained` cannot be used for the recipe's backbone (a recipe error: exit code 2)."""


@contextlib.contextmanager
def loading_named(source: str) -> Iterator[None]:
    """Whatever stops the weights of `source` from loading (a missing or truncated file, shapes that do not fit)
    as one `ModelLoadError` naming it, instead of a library traceback."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        raise ModelLoadError(
            f"model.pretrained={source!r} could not be loaded: {type(e).__name__}: {str(e)[:500]}\n"
            "Give a hub id (with network access or a filled HF cache) or a complete folder written by save_pretrained."
        ) from e
    except Exception as e:  # safetensors' SafetensorError (a truncated file) derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"model.pretrained={source!r}: its weights file is damaged ({e})") from e


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
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )


def _load_pretrained_config(source: str):
    with loading_named(source):
        return AutoConfig.from_pretrained(source)


def build_model(cfg: ModelConfig, id2label: dict[int, str]) -> PreTrainedModel:
    """Build the model of a recipe for the classes `id2label` (contiguous ids 0..C-1): a Mask2Former, or an EoMT
    (`model.family: eomt`, `gd_hf.eomt.build_eomt`)."""
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label must map 0..C-1 to class names, got {id2label}")
    if cfg.family == "eomt":
        from gd_hf.eomt import build_eomt  # (gd_hf.eomt builds on this module)

        model = build_eomt(cfg, id2label)
    elif cfg.pretrained is None:
        model = Mask2FormerForUniversalSegmentation(
            _mask2former_config(cfg, _backbone_config_from_sizes(cfg), id2label)
        )
        if cfg.backbone == "swin":
            give_padding_a_nonzero_embedding(model)
    else:
        pretrained_config = _load_pretrained_config(cfg.pretrained)
        if pretrained_config.model_type == "mask2former":
            model = _load_mask2former_checkpoint(cfg, id2label)
        else:
            model = _build_with_pretrained_backbone(cfg, pretrained_config, id2label)
    use_mean_mask_count_across_processes(model)
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
    if backbone_config.model_type == "eomt":
        raise ModelLoadError(f"model.pretrained={cfg.pretrained!r} is an EoMT checkpoint: set model.family=eomt")
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
            cfg.pretrained,
            id2label={int(k): v for k, v in id2label.items()},
            label2id={v: int(k) for k, v in id2label.items()},
            ignore_mismatched_sizes=True,
        )
    backbone_type = model.config.backbone_config.model_type
    if backbone_type not in BACKBONE_MODEL_TYPES[cfg.backbone]:
        raise ModelLoadError(
            f"model.pretrained={cfg.pretrained!r} has a {backbone_type!r} backbone but model.backbone is {cfg.backbone!r}"
        )
    # New classes mean a new classifier, even when the class count happens to match the checkpoint's.
    model.class_predictor.reset_parameters()
    # The loss settings are the recipe's, not the checkpoint's.
    for key in ("train_num_points", "no_object_weight", "class_weight", "mask_weight", "dice_weight"):
        setattr(model.config, key, getattr(cfg, key))
    model.weight_dict = {
        "loss_cross_entropy": cfg.class_weight,
        "loss_mask": cfg.mask_weight,
        "loss_dice": cfg.dice_weight,
    }
    model.criterion = Mask2FormerLoss(config=model.config, weight_dict=model.weight_dict)
    return model


def use_mean_mask_count_across_processes(model: Mask2FormerForUniversalSegmentation) -> None:
    """Normalise the mask losses by the mean target count over processes, as detectron2 does.

    transformers' `get_num_masks` averages over processes and then divides by the world size again, so with N
    processes the mask and dice terms are N times too large (hf-notes). This replaces the method on this
    instance only; nothing of it is saved, so exported checkpoints stay vanilla.
    """

    def get_num_masks(self, class_labels, device):
        num_masks = torch.as_tensor(float(sum(len(c) for c in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        return torch.clamp(num_masks, min=1)

    model.criterion.get_num_masks = types.MethodType(get_num_masks, model.criterion)


def size_divisibility(model: Mask2FormerForUniversalSegmentation) -> int:
    """Input sides must be multiples of this: the patch size for DINOv2, the coarsest stride (32) otherwise."""
    backbone_config = model.config.backbone_config
    if backbone_config.model_type.startswith("dinov2"):
        return backbone_config.patch_size
    return 32


def build_image_processor(
    model: Mask2FormerForUniversalSegmentation, data: DataConfig, divisor: int | None = None
) -> Mask2FormerImageProcessorPil:
    """The image processor saved with every export: the same resize, padding divisor (the model family's; None:
    `size_divisibility`) and normalisation as our evaluation."""
    return Mask2FormerImageProcessorPil(
        size={"shortest_edge": data.eval_shortest_edge, "longest_edge": data.eval_longest_edge},
        size_divisor=divisor if divisor is not None else size_divisibility(model),
        ignore_index=255,
        do_reduce_labels=False,
    )


def is_model_folder(path: str | Path) -> bool:
    """True for a folder that holds a save_pretrained model."""
    return (Path(path) / "config.json").is_file()


def loss_terms(
    model: Mask2FormerForUniversalSegmentation,
    predictions: Predictions,
    mask_labels: list[torch.Tensor],
    class_labels: list[torch.Tensor],
    no_object_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted Mask2Former loss terms (Hungarian matching, auxiliary layers included) of `predictions`.

    `model` is the unwrapped model. Computing the loss outside `forward` lets the loop log each term and reuse the
    criterion for pseudo labels. `no_object_weight`: the class-loss weight of "no object" for this call instead of
    the model's `config.no_object_weight` (EoMT's criterion weighs its classes the same way).
    """
    if no_object_weight is None:
        return _loss_dict(model, predictions, mask_labels, class_labels)
    criterion = model.criterion
    weights = criterion.empty_weight
    # A new tensor, not an in-place edit: the class loss keeps its weights for the backward pass.
    criterion.empty_weight = torch.cat([weights[:-1], weights.new_tensor([no_object_weight])])
    try:
        return _loss_dict(model, predictions, mask_labels, class_labels)
    finally:
        criterion.empty_weight = weights


def _loss_dict(model, predictions: Predictions, mask_labels, class_labels) -> dict[str, torch.Tensor]:
    return model.get_loss_dict(
        masks_queries_logits=predictions.mask_logits,
        class_queries_logits=predictions.class_logits,
        mask_labels=mask_labels,
        class_labels=class_labels,
        auxiliary_predictions=[
            {"masks_queries_logits": masks, "class_queries_logits": classes} for classes, masks in predictions.auxiliary
        ],
    )


class Mask2FormerFamily:
    """Mask2Former (any AutoBackbone) as Guided Distillation uses it (the `gd_hf.method.ModelFamily` protocol)."""

    black_padding = False  # its image processor pads after normalising: the mean colour

    def forward(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        outputs = model(pixel_values=pixel_values, output_auxiliary_logits=True)
        auxiliary = [(aux["class_queries_logits"], aux["masks_queries_logits"]) for aux in outputs.auxiliary_logits]
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits, auxiliary)

    def loss(
        self, model: torch.nn.Module, predictions: Predictions, mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor], *, no_object_weight: float | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        return loss_terms(model, predictions, mask_labels, class_labels, no_object_weight)

    def padding_divisor(self, model: torch.nn.Module) -> int:
        return size_divisibility(model)

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
