"""What a run publishes of itself: its name, and its recipe and launch records without this machine's paths.

Everything in an export (`best/`, `final/`: the card, `recipe.yaml`, `run_info.json`) and everything sent to a
tracker may end up public. A path that names this machine (absolute, `~/...`, climbing out with `..`, or a
Windows path) is written relative to the run's root, the folder holding the run's output folder, when it lies
there (`/home/me/runs/a/teacher/best` -> `./a/teacher/best`: the `./` keeps it from reading as a hub id), else
relative to the data root, the folder that holds all the recipe's data paths (`{data_root}/train2017`), else as
`{local}/<its last part>`. A root is never the file system's root or a folder just below it (`/`, `/data`):
everything would lie there, named as it is. Paths given relative (`data/synthetic/train`, `outputs/demo`) say
nothing of the machine and are kept. A local teacher export that was pushed is named by its hub id, so that the
published recipe trains again from the Hub.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PureWindowsPath
from typing import Any

from gd_hf.config import Recipe, recipe_to_dict

DATA_ROOT = "{data_root}"
LOCAL = "{local}"
# The recipe keys that hold data paths: their common folder is the data root.
DATA_PATH_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations", "train_shards", "val_shards",
                  "unlabeled_images", "split_file", "classes_file", "hub_dataset")  # fmt: skip


def is_hub_id(name: str | None) -> bool:
    """`owner/name` that is not a local path (a relative path of this machine that exists is a folder)."""
    return bool(name) and not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _is_windows_path(value: str) -> bool:
    return "\\" in value or (len(value) > 2 and value[1] == ":" and value[0].isalpha())


def _usable_root(root: Path | None) -> Path | None:
    """`root` unless it is `/` or one folder below it (every path would be named under it as it is)."""
    return root if root is not None and len(root.parts) > 2 else None


def run_root(recipe: Recipe) -> Path | None:
    """The folder holding the run's output folder (phase 1 of a one-launch run, in `OUTPUT/teacher`: OUTPUT's
    parent as well), when the output folder is given as a path of this machine."""
    if not names_this_machine(recipe.output_dir) or _is_windows_path(recipe.output_dir):
        return None
    output_dir = Path(os.path.normpath(Path(recipe.output_dir).expanduser().absolute()))
    parent = output_dir.parent.parent if output_dir.name == "teacher" else output_dir.parent
    return _usable_root(parent)


def run_name(recipe: Recipe) -> str:
    """The run's name: the hub repository's name when the recipe has one, else the output folder's (phase 1 of a
    one-launch run, in `OUTPUT/teacher`: `<run>-teacher`)."""
    if recipe.hub.repo_id:
        name = recipe.hub.repo_id.rstrip("/").split("/")[-1]
    else:
        name = Path(recipe.output_dir).resolve().name
        if name == "teacher":
            return f"{Path(recipe.output_dir).resolve().parent.name}-teacher"
        return name
    return f"{name}-teacher" if Path(recipe.output_dir).name == "teacher" else name


def names_this_machine(value: str) -> bool:
    """Whether a string is a path that only makes sense on this machine."""
    if not value or "\n" in value or "://" in value:
        return False
    path = Path(value)
    return path.is_absolute() or value.startswith("~") or ".." in path.parts or _is_windows_path(value)


def _absolute(value: str) -> Path:
    return Path(os.path.normpath(Path(value).expanduser().absolute()))


def _data_root(recipe: Recipe) -> Path | None:
    paths = [str(_absolute(v)) for k in DATA_PATH_KEYS
             if isinstance(v := getattr(recipe.data, k), str) and names_this_machine(v) and not _is_windows_path(v)]  # fmt: skip
    if not paths:
        return None
    common = Path(os.path.commonpath(paths))
    return _usable_root(common.parent if common.suffix else common)  # (one file: its folder)


def public_path(value: str, run_parent: Path | None, data_root: Path | None) -> str:
    """`value` without this machine's folders (see the module's doc)."""
    if not names_this_machine(value):
        return value
    if _is_windows_path(value):
        name = PureWindowsPath(value).name
        return f"{LOCAL}/{name}" if name else LOCAL
    path = _absolute(value)
    for root, label in ((run_parent, None), (data_root, DATA_ROOT)):
        if root is None:
            continue
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        if label is None and str(relative) != ".":
            return f"./{relative.as_posix()}"
        if label is not None:
            return label if str(relative) == "." else f"{label}/{relative.as_posix()}"
    return f"{LOCAL}/{path.name}" if path.name else LOCAL


def pushed_to(export: str | Path) -> str | None:
    """The hub id a local export was pushed to (its `run_info.json` says so), or None. A push to a branch is
    named `repo@branch`."""
    info = Path(export) / "run_info.json"
    try:
        hub = json.loads(info.read_text()).get("pushed_to") if info.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(hub, dict) or not isinstance(hub.get("repo_id"), str):
        return None
    return hub["repo_id"] + (f"@{hub['revision']}" if hub.get("revision") else "")


def public_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, with no path of this machine in it."""
    run_parent, data_root = run_root(recipe), _data_root(recipe)
    resolved = recipe_to_dict(recipe)
    teacher = recipe.ssl.teacher
    if teacher is not None and Path(teacher).is_dir() and pushed_to(teacher):
        resolved["ssl"]["teacher"] = pushed_to(teacher)
    return _map_strings(resolved, lambda s: public_path(s, run_parent, data_root))


def public_value(value: Any, recipe: Recipe) -> Any:
    """Any value (a recipe change, a command line) with this recipe's machine paths made public."""
    run_parent, data_root = run_root(recipe), _data_root(recipe)
    return _map_strings(value, lambda s: public_path(s, run_parent, data_root))


def _map_strings(value: Any, change: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change) for v in value]
    if isinstance(value, str):
        if "=" in value and not names_this_machine(value):  # an override on a command line: key=/a/path
            key, _, rest = value.partition("=")
            return f"{key}={change(rest)}"
        return change(value)
    return value


# What a published launch record keeps: when, with which versions and how many processes, and what it changed.
PUBLIC_LAUNCH_KEYS = ("started", "git_commit", "versions", "num_processes", "mixed_precision", "resumed_at_step",
                      "recipe_changes")  # fmt: skip


def public_launches(launches: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    """A run's launch records (`run_info.json`) as published: no command line (the interpreter's path), host or
    platform string, and the recipe changes' paths made public."""
    return [public_value({k: launch[k] for k in PUBLIC_LAUNCH_KEYS if k in launch}, recipe) for launch in launches]
