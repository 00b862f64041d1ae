"""One optimizer step: the method's loss over micro-batches and the update (`train_step`), which takes back or
skips what is non-finite, and the check of its outcome (`check_nonfinite_step`: counts, or stops the run). The
loop (`gd_hf.train`) calls, per step: `GuidedDistillation.start_step`, `train_step`, `check_nonfinite_step`,
`GuidedDistillation.after_step`."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from gd_hf.config import TrainConfig
from gd_hf.run.checkpointing import list_checkpoints
from gd_hf.weights import all_finite

if TYPE_CHECKING:
    from gd_hf.method import GuidedDistillation
    from gd_hf.run.checkpointing import RunState

logger = logging.getLogger("gd_hf.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what is kept and what to try."""


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


@dataclass
class StepOutcome:
    """What one optimizer step did: the values to log (means over the micro-batches, `grad_norm`, `nonfinite`),
    and how the update went."""

    logged: dict[str, float]
    skipped: bool = False  # non-finite loss or gradient on some process: no update (the schedule still steps)
    undone: bool = False  # the update made weights non-finite and was taken back (counted as skipped)
    weights_nonfinite: bool = False  # the same without `UpdateUndo`: the loop must stop


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
    scheduled: dict[str, float] | None = None,
) -> StepOutcome:
    """One optimizer step over `micro_batches` (gradient accumulation) with `method`'s loss (and, given
    `unlabeled_batches`, its unsupervised term), logged as means over the micro-batches. `observe` sees the first
    micro-batch's unlabeled batch and pseudo labels; `scheduled`: what the model family scheduled for this step
    (`GuidedDistillation.start_step`), logged with each micro-batch's loss.

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
                                           observe if index == 0 else None, scheduled)  # fmt: skip
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
) -> StepOutcome:
    """Clip, decide alike on every process whether the step is finite, step (or skip) the optimizer and the
    schedule; the logged values with `grad_norm` and `nonfinite` added."""
    # The gradient norm (after DDP's all-reduce: the same on every rank) also tells whether any rank's loss was
    # non-finite; clipping at inf measures it without changing anything.
    totals["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # A loss can be infinite with a finite gradient (an infinite constant term): every rank must still decide
    # alike, so the number of ranks whose loss is finite is summed over them.
    device = accelerator.device
    finite_losses = torch.isfinite(torch.as_tensor(totals["loss"], device=device)).float()
    if accelerator.num_processes > 1:
        finite_losses = accelerator.reduce(finite_losses, "sum")
    # One host sync for all logged values and the finiteness check (the count of finite losses comes last).
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device)
                          for v in [*totals.values(), finite_losses]]).tolist()  # fmt: skip
    logged = dict(zip(totals, values[:-1]))
    outcome = StepOutcome(logged)
    if math.isfinite(logged["grad_norm"]) and values[-1] == accelerator.num_processes:
        if undo is not None:
            undo.save()
        optimizer.step()
        logged["nonfinite"] = 0.0
        # A finite loss and gradient can still make weights non-finite (a learning rate far too high): such an
        # update never reaches the EMA teacher, a checkpoint or an export.
        if not weights_finite(model, accelerator):
            if undo is not None:
                undo.restore()  # as if skipped: counted like a non-finite step
                logged["nonfinite"] = 1.0
                outcome.skipped = outcome.undone = True
            else:
                outcome.weights_nonfinite = True
        scheduler.step()
    else:  # skip the update (the caller skips the EMA update too); the schedule stays a function of the step
        logged["nonfinite"] = 1.0
        outcome.skipped = True
        with warnings.catch_warnings():  # (torch warns when a run's first update is skipped: meant here)
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return outcome


def weights_finite(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    """`all_finite` of the student on every process (all processes decide alike)."""
    finite = all_finite(accelerator.unwrap_model(model)).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite.to(accelerator.device), "sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def check_nonfinite_step(outcome: StepOutcome, state: RunState, cfg: TrainConfig, checkpoint_dir: Path) -> bool:
    """After `train_step`: True if its update was skipped (non-finite loss or gradient on any process, or taken
    back), counted in `state`; too many in a row stop the run, and so does, at once, an update that made weights
    non-finite without `train.undo_nonfinite_updates` (nothing of it is written: the last checkpoint is as it
    was)."""
    if outcome.weights_nonfinite:
        raise TrainingError(
            f"the update of step {state.step + 1} made weights non-finite (its loss and gradient were finite: "
            f"train.lr {cfg.lr:g} is likely far too high); stopping before they reach the teacher, a checkpoint or "
            f"an export (train.undo_nonfinite_updates is off). {last_good_checkpoint(checkpoint_dir)} To go on with "
            "another train.lr from it, relaunch with resume=force (the change is recorded)."
        )
    if not outcome.skipped:
        state.nonfinite_in_a_row = 0
        return False
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    what = "its update made weights non-finite" if outcome.undone else "non-finite loss or gradient"
    logger.warning("step %d: %s (loss %s, grad norm %s): update skipped (%d in a row)", state.step + 1, what,
                   outcome.logged["loss"], outcome.logged["grad_norm"], state.nonfinite_in_a_row)  # fmt: skip
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
