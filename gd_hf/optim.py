"""AdamW with a backbone learning-rate multiplier and no decay on norms/biases/embeddings, the schedule, and one
optimizer step over micro-batches (`train_step`), which takes back or skips what is non-finite."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from gd_hf.checkpointing import list_checkpoints
from gd_hf.config import TrainConfig
from gd_hf.models import ModelFamily, family_of
from gd_hf.weights import all_finite

if TYPE_CHECKING:
    from gd_hf.checkpointing import RunState
    from gd_hf.method import GuidedDistillation

logger = logging.getLogger("gd_hf.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what is kept and what to try."""


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


def train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    grad_clip: float,
    method: GuidedDistillation,
    unlabeled_batches: list[dict[str, Any]] | None = None,
    undo: UpdateUndo | None = None,
    observe: Callable[[dict[str, Any], Any], None] | None = None,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation) with `method`'s loss (and, given
    `unlabeled_batches`, its unsupervised term); returns the values to log, averaged over the micro-batches.
    `observe` sees the first micro-batch's unlabeled batch and pseudo labels (`GuidedDistillation.loss`).

    An update is skipped when any process's loss or the gradient is non-finite; one that makes a weight
    non-finite is taken back with `undo` (and counted as non-finite), or, without it, reported as
    `weights_nonfinite` for the loop to stop.
    """
    unwrapped = accelerator.unwrap_model(model)
    totals: dict[str, torch.Tensor | float] = {}
    for index, batch in enumerate(micro_batches):
        unlabeled = unlabeled_batches[index] if unlabeled_batches is not None else None
        # Gradients are all-reduced once, on the last micro-batch.
        sync = contextlib.nullcontext() if index == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss, logged = method.loss(model, unwrapped, batch, unlabeled, accelerator.device,
                                           observe if index == 0 else None)  # fmt: skip
            accelerator.backward(loss / len(micro_batches))
        for key, value in logged.items():
            value = value.detach() if torch.is_tensor(value) else value
            totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
    return _apply_update(model, totals, optimizer, scheduler, accelerator, grad_clip, undo)


def _apply_update(
    model: torch.nn.Module,
    totals: dict[str, torch.Tensor | float],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Accelerator,
    grad_clip: float,
    undo: UpdateUndo | None,
) -> dict[str, float]:
    """Clip, decide alike on every process whether the step is finite, step (or skip) the optimizer and the
    schedule; the logged values with `grad_norm` and `nonfinite` added."""
    # The gradient norm (after DDP's all-reduce: the same on every rank) also tells whether any rank's loss was
    # non-finite; clipping at inf measures it without changing anything.
    totals["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # A loss can be infinite with a finite gradient (an infinite constant term): every rank must still decide
    # alike, so the number of ranks whose loss is finite is summed over them.
    device = accelerator.device
    finite_losses = torch.isfinite(torch.as_tensor(totals["loss"], device=device)).float()
    totals["finite_losses"] = (
        accelerator.reduce(finite_losses, "sum") if accelerator.num_processes > 1 else finite_losses
    )
    # One host sync for all logged values and the finiteness check.
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in totals.values()]).tolist()
    logged = dict(zip(totals, values))
    every_loss_finite = logged.pop("finite_losses") == accelerator.num_processes
    if math.isfinite(logged["grad_norm"]) and every_loss_finite:
        if undo is not None:
            undo.save()
        optimizer.step()
        logged["nonfinite"] = 0.0
        # A finite loss and gradient can still make weights non-finite (a learning rate far too high): such an
        # update never reaches the EMA teacher, a checkpoint or an export.
        if not weights_finite(model, accelerator):
            if undo is not None:
                undo.restore()  # as if skipped: counted like a non-finite step
                logged["nonfinite"] = logged["update_undone"] = 1.0
            else:
                logged["weights_nonfinite"] = 1.0
        scheduler.step()
    else:  # skip the update (the caller skips the EMA update too); the schedule stays a function of the step
        logged["nonfinite"] = 1.0
        with warnings.catch_warnings():  # (torch warns when a run's first update is skipped: meant here)
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logged


def weights_finite(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    """`all_finite` of the student on every process (all processes decide alike)."""
    finite = all_finite(accelerator.unwrap_model(model)).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.to(accelerator.device), "sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def check_nonfinite_step(logged: dict[str, float], state: RunState, cfg: TrainConfig, checkpoint_dir: Path) -> bool:
    """After `train_step`: True if its update was skipped (non-finite loss or gradient on any process, or taken
    back), counted in `state`; too many in a row stop the run, and so does, at once, an update that made weights
    non-finite without `train.undo_nonfinite_updates` (nothing of it is written: the last checkpoint is as it
    was)."""
    if logged.pop("weights_nonfinite", 0.0):
        raise TrainingError(
            f"the update of step {state.step + 1} made weights non-finite (its loss and gradient were finite: "
            f"train.lr {cfg.lr:g} is likely far too high); stopping before they reach the teacher, a checkpoint or "
            f"an export (train.undo_nonfinite_updates is off). {last_good_checkpoint(checkpoint_dir)} To go on with "
            "another train.lr from it, relaunch with resume=force (the change is recorded)."
        )
    if not logged["nonfinite"]:
        state.nonfinite_in_a_row = 0
        return False
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    what = "its update made weights non-finite" if logged.pop("update_undone", 0.0) else "non-finite loss or gradient"
    logger.warning("step %d: %s (loss %s, grad norm %s): update skipped (%d in a row)", state.step + 1, what,
                   logged["loss"], logged["grad_norm"], state.nonfinite_in_a_row)  # fmt: skip
    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingError(
            f"{state.nonfinite_in_a_row} steps in a row were skipped (a non-finite loss or gradient, or an update "
            f"that made weights non-finite; the warnings above say which), up to step {state.step + 1}; stopping. "
            f"{last_good_checkpoint(checkpoint_dir)} Look for broken labels around this step, or go on from it with "
            "a lower train.lr, a train.grad_clip or bf16 instead of fp16 (resume=force: the change is recorded)."
        )
    return True


def last_good_checkpoint(checkpoint_dir: Path) -> str:
    """The sentence naming the checkpoint a relaunch resumes from (every checkpoint holds finite weights)."""
    last = list_checkpoints(checkpoint_dir)
    if not last:
        return "There is no checkpoint yet: a relaunch starts from the beginning."
    return f"The last good checkpoint is {last[-1]}."
