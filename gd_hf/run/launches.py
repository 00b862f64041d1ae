"""Pre-flight checks on the output folder (space, a lock per folder), what each launch records for
reproducibility, and what a relaunch may change of a run's recipe."""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from gd_hf.config import Recipe, RecipeError, recipe_to_dict
from gd_hf.files import output_problem, write_text_atomic

launch_logger = logging.getLogger("gd_hf.train")  # what a launch says about its relaunch

PACKAGES = ("gd_hf", "torch", "transformers", "accelerate", "datasets", "huggingface_hub", "torchdata", "pycocotools")


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if absent)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


RUN_FILES = ("metrics.jsonl", "run_info.json", "recipe.yaml", "final_metrics.json", "curves.png")


def check_output_folder(output_dir: str | Path, needed_bytes: int) -> str | None:
    """Why `output_dir` cannot take the run (not writable, too little free space), or None if it can. A resumed
    run's own checkpoints and exports count as space it has: they are replaced as it goes."""
    output_dir = Path(output_dir)
    if problem := output_problem(output_dir, folder=True):  # (a file there or above it; not writable)
        return f"output_dir {output_dir}: {problem}: choose another output_dir"
    parent = _existing_parent(output_dir)
    for name in RUN_FILES:  # what the run writes as files: a folder there would stop it mid-way
        if (output_dir / name).exists() and not (output_dir / name).is_file():
            return f"{output_dir / name} is not a file (the run writes its {name} there): move it away"
    free = shutil.disk_usage(parent).free
    needed_bytes -= sum(folder_bytes(output_dir / name) for name in ("checkpoints", "best", "final"))
    if free < needed_bytes:
        return (
            f"output_dir {output_dir} has {free / 1e9:.2f} GB free but the run needs about {needed_bytes / 1e9:.2f} GB "
            "(checkpoints + exports): free space, lower train.keep_checkpoints, or choose another output_dir"
        )
    return None


def tidy_after_a_stopped_launch(output_dir: str | Path) -> list[str]:
    """What a killed launch left in a run's folder, put right by the next one (which holds the folder's lock): an
    export it was writing (`.final.tmp.*`: removed; ~the model's size each) and, if it was killed between moving
    the previous export aside and putting the new one in place, that previous one (`.best.old` without `best/`:
    put back; beside `best/`: removed). Returns what it did, one line each."""
    output_dir, done = Path(output_dir), []
    if not output_dir.is_dir():
        return done
    for path in sorted(output_dir.glob(".*")):
        if not path.is_dir():
            continue
        if ".tmp." in path.name:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name} (an export a stopped launch was writing)")
        elif path.name.startswith(".") and path.name.endswith(".old"):
            export = output_dir / path.name[1:-4]
            if export.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path.name} (the export {export.name}/ replaced)")
            else:
                os.replace(path, export)
                done.append(f"put {export.name}/ back (a stopped launch had moved it aside to replace it)")
    return done


def run_storage_bytes(num_parameters: int, keep_checkpoints: int, with_teacher: bool) -> int:
    """A generous estimate of what a run writes: fp32 weights + 2 AdamW moments (+ the teacher) per checkpoint,
    one checkpoint being written beside the kept ones, plus the best/final exports."""
    weights = num_parameters * 4
    checkpoint = weights * (3 + (1 if with_teacher else 0))
    return checkpoint * (keep_checkpoints + 1) + weights * 2 + 50_000_000


def git_commit(path: Path) -> str | None:
    """The commit of the git checkout holding `path` (with `-dirty` if it has changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=path, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def launch_record(num_processes: int, mixed_precision: str) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "versions": {"python": platform.python_version(), **versions},
        "platform": platform.platform(),
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
    }


def record_launch(
    output_dir: str | Path,
    num_processes: int,
    mixed_precision: str,
    recipe: dict[str, Any] | None = None,
    resumed_at_step: int | None = None,
    recipe_changes: dict[str, list[Any]] | None = None,
) -> Path:
    """Append this launch to `output_dir/run_info.json` (a list: a resumed run adds a launch): its record, its
    recipe, the step it resumed at and the recipe keys it changed (`[old, new]`)."""
    path = Path(output_dir) / "run_info.json"
    launches = read_launches(output_dir)
    record = launch_record(num_processes, mixed_precision)
    if recipe is not None:
        record.update(recipe=recipe, resumed_at_step=resumed_at_step, recipe_changes=recipe_changes or {})
    launches.append(record)
    write_text_atomic(path, json.dumps(launches, indent=2) + "\n")
    return path


def read_launches(output_dir: str | Path) -> list[dict[str, Any]]:
    """The launch records of a run. An unreadable `run_info.json` (edited by hand: gd_hf writes it atomically) is
    kept beside as `run_info.json.unreadable` and the record starts anew, with a warning."""
    path = Path(output_dir) / "run_info.json"
    if not path.is_file():
        return []
    try:
        launches = json.loads(path.read_text())
        if isinstance(launches, list) and all(isinstance(launch, dict) for launch in launches):
            return launches
    except (ValueError, OSError):
        pass
    kept = path.with_name("run_info.json.unreadable")
    os.replace(path, kept)
    logging.getLogger("gd_hf.train").warning("%s cannot be read: kept as %s, the launch record starts anew", path, kept)
    return []


# Recipe keys a relaunch may change: how long, how often, how it is evaluated, where things go; not what is
# trained. (`train.max_steps` extends or shortens the run, and with it the poly / cosine schedule from here on.)
MAY_CHANGE = (
    "output_dir",
    "resume",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.undo_nonfinite_updates",
    "eval.*",
    "data.num_workers",
    "data.records_cache",
    "data.generate_synthetic",
    "data.eval_shortest_edge",
    "data.eval_longest_edge",
    "ssl.evaluate",
    "ssl.teacher_check*",
    "hub.*",
    "train.report_to",
    "data.dataset_name",
)


def flat_keys(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_changes(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """The dotted keys whose value differs between two resolved recipes: `{key: [previous, current]}`. Two
    spellings of one existing file or folder (relative and absolute, say) are the same value."""
    old, new = flat_keys(previous), flat_keys(current)
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not _same_path(old.get(key), new.get(key))
    }


def _same_path(a: Any, b: Any) -> bool:
    if not (isinstance(a, str) and isinstance(b, str) and a and b):
        return False
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def changes_what_is_trained(key: str) -> bool:
    return not any(fnmatch.fnmatchcase(key, pattern) for pattern in MAY_CHANGE)


def describe_changes(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def launches_note(launches: list[dict[str, Any]]) -> str | None:
    """A model-card line on the launches that trained the weights (those since the last fresh start), when there
    was more than one."""

    def resumed_at(launch: dict[str, Any]) -> int | None:
        step = launch.get("resumed_at_step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    fresh = [i for i, launch in enumerate(launches) if resumed_at(launch) is None]
    since_fresh = launches[fresh[-1] + 1 :] if fresh else launches
    resumed = [launch for launch in since_fresh if resumed_at(launch) is not None]
    if not resumed:
        return None
    parts = []
    for launch in resumed:
        changes = launch.get("recipe_changes")
        changes = changes if isinstance(changes, dict) else {}
        changed = {k: v for k, v in changes.items() if k != "resume" and isinstance(v, list) and len(v) == 2}
        # The card may be published: a folder of this machine is named by its last part only.
        changed = {k: [_public(old), _public(new)] for k, (old, new) in changed.items()}
        what = f" with {describe_changes(changed)}" if changed else ""
        parts.append(f"resumed at step {resumed_at(launch)}{what}")
    if not fresh:  # the record of the first launches is gone (an unreadable run_info.json set aside)
        return f"Trained in more than {len(resumed)} launches; the record holds these: " + "; ".join(parts) + "."
    return f"Trained in {len(resumed) + 1} launches: the first from step 0, then " + "; ".join(parts) + "."


def _public(value: Any) -> Any:
    """`value`, with a path of this machine cut to its last part (`/home/me/runs/a` -> `.../a`)."""
    if isinstance(value, str) and ("/" in value.strip("/") or "\\" in value) and Path(value).name:
        return f".../{Path(value).name}"
    return value


# --- one launch per output folder ------------------------------------------------------------------------------

LOCK_FILE = ".gd_hf.lock"
_held_locks: dict[Path, Any] = {}  # folder -> open lock file, for this process's lifetime or until released


def lock_output_folder(output_dir: str | Path) -> str | None:
    """Take the output folder's lock for this process (an OS lock, released when the process ends, however it
    ends: a dead process's lock is free to take); None when taken, else why it cannot be (who holds it)."""
    folder = Path(output_dir).resolve()
    if folder in _held_locks:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK_FILE).open("a+")
    except OSError as e:
        return f"output_dir {output_dir} is not writable ({e}): choose another output_dir"
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows: no flock; one launch per folder is then up to the user
        pass
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return (
            f"output_dir {output_dir} is in use by another launch ({holder}): wait for it to end, stop it, or "
            "choose another output_dir"
        )
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}")
    handle.flush()
    _held_locks[folder] = handle
    return None


def release_output_locks() -> None:
    """Release every output-folder lock this process holds."""
    for handle in _held_locks.values():
        handle.close()  # closing the file releases its flock
    _held_locks.clear()


def hold_output_locks(accelerator: Accelerator, folders: list[str] | tuple[str, ...]) -> None:
    """One launch per output folder: the main process takes each folder's lock (held until the launch ends); if
    one cannot be taken (another live launch holds it, or the folder is not writable), every process stops
    naming why."""
    problems = [p for p in (lock_output_folder(f) for f in folders) if p] if accelerator.is_main_process else []
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problems = broadcast_object_list([problems])[0]
    if problems:
        raise RecipeError("; ".join(problems))


def check_relaunch(
    recipe: Recipe, launch_recipe: Recipe, saved: dict[str, Any], checkpoint: Path,
    extension_points: dict[str, str] | None = None, data_fingerprint: dict[str, str] | None = None,
) -> dict[str, list[Any]]:  # fmt: skip
    """Compare this launch's recipe with the one that trained `checkpoint`: a change to what is trained (model,
    data, optimiser, schedule, batch, seed, method) stops the run unless `resume: force`; a change of how long,
    how often or where goes on with a line. `extension_points`: the classes of the custom pseudo-label rule or
    model family passed from Python (`python:NAME` in the changes; absent = the recipe's own). Returns the
    changes, for the launch record."""
    previous = saved.get("recipe")
    if not isinstance(previous, dict):
        launch_logger.warning(
            "%s does not say which recipe trained it: the relaunch's recipe is not compared", checkpoint
        )
        return {}
    changes = recipe_changes(previous, recipe_to_dict(launch_recipe))
    # A key added to gd_hf after the checkpoint was written (absent from its recipe) and left at its default
    # changes nothing: the run trained as that default does.
    saved_keys, defaults = flat_keys(previous), flat_keys(recipe_to_dict(Recipe()))
    changes = {
        key: change
        for key, change in changes.items()
        if key in saved_keys or key not in defaults or change[1] != defaults[key]
    }
    # Extension points are not recipe keys: each checkpoint records their classes, and a relaunch that swaps one
    # changes what is trained as a changed key would.
    before, now = saved.get("extension_points") or {}, extension_points or {}
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            changes[f"python:{name}"] = [before.get(name, "the recipe's"), now.get(name, "the recipe's")]
    # The files the data keys name, changed in place (a recipe key unchanged): as a changed key.
    before, now = saved.get("data_fingerprint") or {}, data_fingerprint or {}
    for key in sorted(set(before) & set(now)):
        if before[key] != now[key] and key not in changes:
            changes[f"{key} (the files)"] = [before[key], now[key]]
    # A supervised run (phase 1 of a one-launch run included) is not changed by the keys of phases 2-3.
    supervised = not launch_recipe.ssl.enabled and not previous.get("ssl", {}).get("enabled")
    trained = {
        key: change
        for key, change in changes.items()
        if changes_what_is_trained(key) and not (supervised and key.startswith("ssl."))
    }
    if trained and recipe.resume != "force":
        raise RecipeError(
            f"this relaunch changes what the run in {recipe.output_dir} trained (checkpoint {checkpoint.name}): "
            f"{describe_changes(trained)}. To train with the new values, start a new run (another output_dir); to "
            "go on from this checkpoint with them, relaunch with resume=force (the change is recorded in "
            "run_info.json and the model card)."
        )
    if trained:
        launch_logger.warning("resume=force: going on from %s with %s", checkpoint, describe_changes(trained))
    others = {key: change for key, change in changes.items() if key not in trained and key != "resume"}
    if others:
        launch_logger.info("relaunch: %s", describe_changes(others))
    return changes
