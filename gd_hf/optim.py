"""AdamW with a backbone learning-rate multiplier and no decay on norms/biases/embeddings, plus the schedule."""

from __future__ import annotations

import math

import torch

from gd_hf.config import TrainConfig

# Parameter-name fragments that never get weight decay (detectron2's Mask2Former recipe: norms and embeddings).
NO_DECAY_FRAGMENTS = ("norm", "embeddings", "position", "query_feat", "query_embed", "level_embed", "relative_position_bias_table", "mask_token", "cls_token")


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four groups: {backbone, rest} x {decay, no decay}; biases and 1-D norm weights never decay."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_backbone = ".pixel_level_module.encoder." in f".{name}"
        no_decay = parameter.ndim <= 1 or any(f in name for f in NO_DECAY_FRAGMENTS)
        groups.setdefault((is_backbone, no_decay), []).append(parameter)
    return [
        {
            "params": params,
            "lr": cfg.lr * (cfg.backbone_lr_multiplier if is_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": f"{'backbone' if is_backbone else 'heads'}{'_no_decay' if no_decay else ''}",
        }
        for (is_backbone, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (fused/foreach kernels are picked by torch where available)."""
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


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
