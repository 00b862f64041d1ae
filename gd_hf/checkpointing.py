"""The run's state (`RunState`) and resumable checkpoints: `accelerator.save_state` into a temporary folder
renamed into place, keep-last-K."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
DATA_STATE = "data_state_rank{rank}.pt"


@dataclass
class RunState:
    """The loop's own state, saved in every checkpoint (`trainer_state.json`) and restored as a whole on resume
    (the model, optimizer, schedule, RNG and stream positions are saved beside it by `save_checkpoint`)."""

    step: int = 0  # optimizer steps done
    best_ap: float = -1.0  # best val mask AP so far, and its step (the `best/` export)
    best_step: int | None = None
    data_skipped: int = 0  # bad records skipped (data.on_error: skip), all processes, up to the last checkpoint
    nonfinite_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    nonfinite_in_a_row: int = 0  # ... of them in a row (train.max_nonfinite_steps stops the run)
    replica_fingerprints: dict[str, list[float]] | None = None  # multi-process: weight checksums per rank

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("best_step",)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones carry a leading '.' and are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    data_state: dict[str, Any] | None = None,
) -> Path:
    """Save model/optimizer/scheduler/RNG + `trainer_state` as `step_{step:08d}`, then delete all but the newest `keep`.

    `data_state` (stream positions, different on every process) is written by each process for itself."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step_{step:08d}"
    tmp = checkpoint_dir / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if data_state:
        torch.save(data_state, tmp / DATA_STATE.format(rank=accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The loop's own state (step, best AP) stored in a checkpoint."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete gd_hf checkpoint (no {TRAINER_STATE})")
    return json.loads(path.read_text())


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from a checkpoint written by `save_checkpoint`; return its trainer state."""
    state = read_trainer_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    return state


def read_data_state(checkpoint: str | Path, rank: int) -> dict[str, Any]:
    """This process's stream positions saved in a checkpoint ({} if there are none, e.g. map-style data)."""
    path = Path(checkpoint) / DATA_STATE.format(rank=rank)
    return torch.load(path, weights_only=False) if path.is_file() else {}
