"""Pre-flight checks on the output folder, and what each launch records for reproducibility."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("gd_hf", "torch", "transformers", "accelerate", "datasets", "huggingface_hub", "torchdata", "pycocotools")


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_output_folder(output_dir: str | Path, needed_bytes: int) -> str | None:
    """Why `output_dir` cannot take the run (not writable, too little free space), or None if it can."""
    output_dir = Path(output_dir)
    parent = _existing_parent(output_dir)
    if not parent.is_dir():
        return f"output_dir {output_dir}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"output_dir {output_dir} is not writable ({parent} does not allow it): choose another output_dir"
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        return (
            f"output_dir {output_dir} has {free / 1e9:.2f} GB free but the run needs about {needed_bytes / 1e9:.2f} GB "
            "(checkpoints + exports): free space, lower train.keep_checkpoints, or choose another output_dir"
        )
    return None


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


def record_launch(output_dir: str | Path, num_processes: int, mixed_precision: str) -> Path:
    """Append this launch to `output_dir/run_info.json` (a list: a resumed run adds a launch)."""
    path = Path(output_dir) / "run_info.json"
    launches = json.loads(path.read_text()) if path.is_file() else []
    launches.append(launch_record(num_processes, mixed_precision))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(launches, indent=2) + "\n")
    tmp.replace(path)
    return path
