"""The run's state (`RunState`) and resumable checkpoints: `accelerator.save_state` into a temporary folder,
flushed to disk and renamed into place, keep-last-K; on resume, the newest checkpoint that reads whole.

Nothing in a checkpoint folder is unpickled with arbitrary code: accelerate loads the weights (safetensors), the
optimizer and the RNG states with `torch.load(weights_only=True)`, and gd_hf loads its own files (the schedule,
the EMA teacher, the stream positions) the same way, or as JSON. (accelerate's `register_for_checkpointing` is
not used: its `load_state` unpickles those objects with `weights_only=False`.)"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gd_hf.config import Recipe, RecipeError
from gd_hf.files import replace_durably

logger = logging.getLogger(__name__)
launch_logger = logging.getLogger("gd_hf.train")  # what a launch says about its resume

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"
DATA_STATE = "data_state_rank{rank}.pt"
# The state dicts of what the loop adds to a checkpoint (the schedule, the EMA teacher), in that order.
EXTRA_STATE = "gd_hf_state_{index}.pt"


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
    # `ssl.pseudo_label_score_threshold: auto`: the threshold the teacher check chose at the run's start
    pseudo_label_score_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("best_step",)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Checkpoints, oldest first (partial ones carry a leading '.' and are ignored; whether one reads whole is
    `checkpoint_problem`'s to say)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    data_state: dict[str, Any] | None = None,
    extra_states: list[torch.nn.Module | Any] = (),
) -> Path:
    """Save model/optimizer/RNG + `extra_states` (objects with `state_dict`: the schedule, the EMA teacher) +
    `trainer_state` as `step_{step:08d}`, then delete all but the newest `keep`.

    `data_state` (stream positions, different on every process) is written by each process for itself. The
    folder is flushed to disk before it is renamed into place: a crash leaves the previous checkpoint or this one."""
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
        for index, obj in enumerate(extra_states):
            torch.save(obj.state_dict(), tmp / EXTRA_STATE.format(index=index))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        replace_durably(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The loop's own state (step, best AP) stored in a checkpoint; a `CheckpointError` if it cannot be read."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a complete gd_hf checkpoint (no {TRAINER_STATE})")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e})") from e
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} does not hold a step count")
    for key, kind in (("best_ap", (int, float)), ("data_skipped", int), ("nonfinite_steps", int),
                      ("nonfinite_in_a_row", int), ("pseudo_label_score_threshold", (int, float))):  # fmt: skip
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: {key} is {state[key]!r}")
    return state


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (a truncated file, an empty state)."""


def checkpoint_problem(checkpoint: str | Path, extra_states: int = 1) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None if every file it needs is there and reads whole.
    `extra_states`: how many `gd_hf_state_*.pt` files the run saves (see `save_checkpoint`), when the checkpoint
    does not say which recipe wrote it.

    Without unpickling anything but tensors and plain values: the trainer state is parsed, safetensors headers
    are checked against the file size, every torch-saved file (a zip archive) is CRC-checked and loaded as a
    resume would load it (`weights_only`, memory-mapped), and then every tensor is read once for `state_problem`
    (finite values, an optimizer of this model: about one model, optimizer and teacher in memory for a moment)."""
    checkpoint = Path(checkpoint)
    if any(checkpoint.glob("custom_checkpoint_*.pkl")):
        return (
            "it was written by an older gd_hf, whose schedule and teacher states resume only by unpickling "
            "(custom_checkpoint_*.pkl): resume it with that version, or start afresh"
        )
    try:
        state = read_trainer_state(checkpoint)
    except CheckpointError as e:
        return str(e)
    recipe = state.get("recipe")
    streamed = False
    if isinstance(recipe, dict) and isinstance(recipe.get("ssl"), dict):  # what its own run saved
        extra_states = 2 if recipe["ssl"].get("enabled") else 1
        streamed = bool(isinstance(recipe.get("data"), dict) and recipe["data"].get("streaming"))
    # Every process that wrote it left its RNG state (and stream position): the number of processes is recorded,
    # or, for a checkpoint that does not say, counted.
    writers = state.get("num_processes")
    if not isinstance(writers, int) or isinstance(writers, bool) or writers < 1:
        writers = max(1, len(list(checkpoint.glob("random_states_*.pkl"))))
    needed = ["optimizer.bin"] + [EXTRA_STATE.format(index=i) for i in range(extra_states)]
    needed += [f"random_states_{rank}.pkl" for rank in range(writers)]
    if streamed:  # without its stream position a process would start its stream again, silently
        needed += [DATA_STATE.format(rank=rank) for rank in range(writers)]
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        return f"it lacks {missing}"
    from safetensors import safe_open

    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights and not (checkpoint / "pytorch_model.bin").is_file():
        return f"{checkpoint} holds no model weights"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors' SafetensorError derives from Exception only
            return f"{path.name} is damaged ({e})"
    from accelerate.utils import load

    loaded = {}
    for path in sorted(checkpoint.iterdir()):  # every process's files: all processes must choose alike
        if path.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{path.name} is damaged ({e})"
        if broken is not None:
            return f"{path.name} is damaged (member {broken} fails its CRC)"
        # Loaded as the resume loads it (accelerate's load: weights_only, numpy's RNG types allowed; accelerate's
        # load_state even ignores an unreadable RNG file without a word, and the resume is then not exact).
        try:
            loaded[path.name] = load(path, map_location="cpu", mmap=True)
        except Exception as e:  # an UnpicklingError for anything but tensors, numbers and numpy RNG states
            return f"{path.name} cannot be read ({type(e).__name__}: {str(e)[:200]})"
    return state_problem(weights, loaded)


def state_problem(weights: list[Path], loaded: dict[str, Any]) -> str | None:
    """What makes a checkpoint that reads whole still not one to go on from: a non-finite value in the weights,
    the optimizer's moments or the EMA teacher (a run resumed from it turns NaN at once, and so would every
    relaunch), or an optimizer state that is not this model's (its moments' shapes are not the weights')."""
    from safetensors.torch import load_file

    shapes: Counter[tuple[int, ...]] = Counter()
    for path in weights:
        for name, tensor in load_file(str(path)).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{path.name} holds non-finite values ({name})"
            shapes[tuple(tensor.shape)] += 1
    for name, content in loaded.items():
        for where, tensor in _tensors(content):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{name} holds non-finite values ({where})"
    optimizer = loaded.get("optimizer.bin")
    if shapes and isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict):
        moments = Counter(tuple(s["exp_avg"].shape) for s in optimizer["state"].values()
                          if isinstance(s, dict) and torch.is_tensor(s.get("exp_avg")))  # fmt: skip
        if moments - shapes:
            return ("optimizer.bin is not this model's optimizer state (moments of shapes "
                    f"{sorted(moments - shapes)[:3]} match no weight)")  # fmt: skip
    return None


def _tensors(value: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts and lists, with where it is."""
    if torch.is_tensor(value):
        return [(where, value)]
    if isinstance(value, dict):
        return [t for key, inner in value.items() for t in _tensors(inner, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [t for i, inner in enumerate(value) for t in _tensors(inner, f"{where}[{i}]")]
    return []


def load_checkpoint(
    accelerator: Accelerator, checkpoint: str | Path, extra_states: list[torch.nn.Module | Any] = ()
) -> dict[str, Any]:
    """Restore model/optimizer/RNG and `extra_states` (as given to `save_checkpoint`) from a checkpoint written
    by `save_checkpoint`; return its trainer state. Nothing is unpickled beyond tensors and plain containers: what
    cannot be loaded is a `RecipeError` naming the checkpoint. A checkpoint written by another number of processes
    resumes with a warning (the new processes' random states start afresh)."""
    try:
        state = read_trainer_state(checkpoint)
        accelerator.load_state(str(checkpoint))
        for index, obj in enumerate(extra_states):
            path = Path(checkpoint) / EXTRA_STATE.format(index=index)
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError) as e:
        raise RecipeError(
            f"checkpoint {checkpoint} cannot be loaded ({type(e).__name__}: {str(e)[:300]}). Only weights, "
            "tensors and plain values are loaded from a checkpoint folder; move this one away to resume from "
            "an earlier one, or choose another output_dir"
        ) from e
    launch_logger.info("resumed from %s at step %d", checkpoint, state.get("step", 0))
    writers = state.get("num_processes")
    if isinstance(writers, int) and writers != accelerator.num_processes:
        launch_logger.warning(
            "%s was written by %d processes and this launch has %d: the data order is the same (step-indexed), "
            "but the new processes' random states start afresh, so the run is not bitwise what it would have been",
            checkpoint, writers, accelerator.num_processes,
        )  # fmt: skip
    return state


def read_data_state(checkpoint: str | Path, rank: int) -> dict[str, Any]:
    """This process's stream positions saved in a checkpoint ({} if there are none, e.g. map-style data)."""
    path = Path(checkpoint) / DATA_STATE.format(rank=rank)
    return torch.load(path, weights_only=True) if path.is_file() else {}


def find_resume_checkpoint(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from according to `recipe.resume` (see `Recipe.resume`): with `auto`/`force`
    the newest one that reads whole, passing over (and naming) damaged newer ones."""
    checkpoint_dir = Path(recipe.output_dir) / "checkpoints"
    complete = list_checkpoints(checkpoint_dir)
    extra_states = 2 if recipe.ssl.enabled else 1  # the schedule, and the EMA teacher (`checkpointed_states`)
    if recipe.resume == "none":
        if complete:
            raise RecipeError(
                f"resume: none, but {checkpoint_dir} already holds checkpoints: set resume: auto to continue, "
                "or choose another output_dir"
            )
        return None
    if recipe.resume in ("auto", "force"):
        partial_ones = sorted(p.name for p in checkpoint_dir.glob(".tmp_step_*")) if checkpoint_dir.is_dir() else []
        if partial_ones:
            launch_logger.warning(
                "ignoring partial checkpoint(s) %s in %s (a run stopped while writing)", partial_ones, checkpoint_dir
            )
        problems = []
        for checkpoint in reversed(complete):
            problem = checkpoint_problem(checkpoint, extra_states)
            if problem is None:
                if problems:
                    launch_logger.warning("resuming from %s, the newest checkpoint that reads whole", checkpoint)
                return checkpoint
            launch_logger.warning("checkpoint %s cannot be resumed from: %s", checkpoint, problem)
            problems.append(f"{checkpoint.name}: {problem}")
        if problems:
            raise RecipeError(
                f"no checkpoint in {checkpoint_dir} can be resumed from ({'; '.join(problems)}): move them away to "
                "start afresh, or choose another output_dir"
            )
        return None
    path = Path(recipe.resume)
    if not path.is_dir():
        raise RecipeError(
            f"resume: {recipe.resume} is neither 'auto', 'none', 'force' nor an existing checkpoint folder"
        )
    problem = checkpoint_problem(path, extra_states)
    if problem is not None:
        raise RecipeError(f"resume: {path} cannot be resumed from: {problem}")
    return path
