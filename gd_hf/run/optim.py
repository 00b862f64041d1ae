"""AdamW with a backbone learning-rate multiplier (times the model family's factors) and no decay on
norms/biases/embeddings, and the learning-rate schedule (the step itself: `gd_hf.run.step`)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from gd_hf.config import TrainConfig
from gd_hf.models import ModelFamily, family_of

if TYPE_CHECKING:
    pass

logger = logging.getLogger("gd_hf.train")


NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
# Free-standing tables (not inside nn.Embedding) that detectron2's Mask2Former recipe does not decay either.
NO_DECAY_NAMES = (
    "relative_position_bias_table",
    "position_embeddings",
    "mask_token",
    "cls_token",
    "register_tokens",
    "level_embed",
)


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters that never decay: norms, embeddings, position tables, and every bias / 1-D parameter."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                isinstance(module, (*NORM_TYPES, torch.nn.Embedding))
                or parameter.ndim <= 1
                or any(n in param_name for n in NO_DECAY_NAMES)
            ):
                names.add(full)
    return names


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig, family: ModelFamily | None = None) -> list[dict]:
    """{backbone, rest} x {decay, no decay}, the backbone at `lr * backbone_lr_multiplier` times the model
    family's factor of each parameter (`ModelFamily.lr_scale`: e.g. EoMT's layer-wise `train.layer_lr_decay`),
    one group per factor. `family` None: the built-in family of the model's `model_type`."""
    family = family if family is not None else family_of(model)
    no_decay_names = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = family.lr_scale(model, name, cfg.layer_lr_decay)
        groups.setdefault((scale is not None, name in no_decay_names, scale or 1.0), []).append(parameter)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.backbone_lr_multiplier * scale if is_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": f"{'backbone' if is_backbone else 'heads'}{'_no_decay' if no_decay else ''}"
            + (f"_x{scale:.4g}" if scale != 1.0 else ""),
        }
        for (is_backbone, no_decay, scale), params in sorted(groups.items(), key=lambda item: item[0])
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, family: ModelFamily | None = None) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (fused/foreach kernels are picked by torch where available)."""
    return torch.optim.AdamW(parameter_groups(model, cfg, family), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's base lr at optimizer step `step`: linear warm-up, then poly/cosine/constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "poly":
        return (1.0 - progress) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor` (stateless in the step, so resume restores it exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
