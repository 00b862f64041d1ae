"""AdamW with a backbone learning-rate multiplier and no decay on norms/biases/embeddings, plus the schedule."""

from __future__ import annotations

import math

import torch

from gd_hf.config import TrainConfig

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


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four groups: {backbone, rest} x {decay, no decay}, the backbone at `lr * backbone_lr_multiplier`."""
    no_decay_names = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_backbone = ".pixel_level_module.encoder." in f".{name}"
        groups.setdefault((is_backbone, name in no_decay_names), []).append(parameter)
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


class UpdateUndo:
    """Takes back an optimizer step: `save()` copies the parameters and the optimizer's state before the step,
    `restore()` puts them back, so a step whose update made a weight non-finite is as if it was never taken
    (the optimizer's moments and step counts included). The copies cost about 3x the trained parameters in memory
    (fp32 weights + AdamW's two moments); the buffers are made once and reused every step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.had_state: list[bool] = []
        self.saved: list[torch.Tensor] = []
        self.sources: list[torch.Tensor] = []

    def _tensors(self) -> list[torch.Tensor]:
        state = self.optimizer.state
        return [p.data for p in self.params] + [
            value for p in self.params for _, value in sorted(state.get(p, {}).items()) if torch.is_tensor(value)
        ]

    @torch.no_grad()
    def save(self) -> None:
        """Copy the parameters and the optimizer state (call right before `optimizer.step()`)."""
        self.had_state = [bool(self.optimizer.state.get(p)) for p in self.params]
        sources = self._tensors()
        if [t.shape for t in sources] != [t.shape for t in self.saved] or any(
            s.device != t.device or s.dtype != t.dtype for s, t in zip(sources, self.saved)
        ):
            self.saved = [torch.empty_like(t) for t in sources]  # the first step creates AdamW's state
        torch._foreach_copy_(self.saved, sources)
        self.sources = sources

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what `save` copied; state the step created for a parameter is dropped again."""
        torch._foreach_copy_(self.sources, self.saved)
        for p, had in zip(self.params, self.had_state):
            if not had:
                self.optimizer.state.pop(p, None)
