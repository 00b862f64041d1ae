"""Whether weights are finite: checked after every update, before every checkpoint and export (nothing written is
ever NaN)."""

from __future__ import annotations

import math

import torch


class NonFiniteWeightsError(RuntimeError):
    """NaN or infinite weights were about to be written (a checkpoint or an export): refused."""


def all_finite(module: torch.nn.Module) -> torch.Tensor:
    """Whether every floating-point parameter and buffer of `module` is finite: a 0-dim bool tensor on the
    module's device (no host sync; one fused norm over all tensors)."""
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return torch.tensor(True)
    # The max-norm: NaN and inf propagate, and no sum of squares can overflow for finite weights.
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all()


def check_finite(module: torch.nn.Module, what: str) -> None:
    """Raise `NonFiniteWeightsError` if `module` holds a non-finite weight: called before every checkpoint and
    export, so nothing written is ever NaN."""
    if not bool(all_finite(module)):
        bad = [name for name, t in module.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        raise NonFiniteWeightsError(
            f"{what} holds non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}): not written"
        )
