"""What the commands take from a run's output folder: which export (`export_folder`, `chosen_export`: push,
predict, evaluate and space), and the val set its recipe trained with (`run_val_set`: evaluate and predict need no
more than the folder)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml


class RunFolderError(ValueError):
    """A folder that is not what a command needs of a run (the message says what it lacks and what to give)."""


def export_folder(path: str | Path, folder: str = "final") -> Path:
    """The export in `path`: `path` itself if it is one (has config.json), else the run's `path/folder` (the one
    place that says which export of a run push, predict, evaluate and space take)."""
    path = Path(path)
    chosen = path if (path / "config.json").is_file() else path / folder
    if not (chosen / "config.json").is_file():
        raise RunFolderError(
            f"{chosen} is not an exported model (no config.json): give a run's output folder or an export"
        )
    return chosen


def chosen_export(model: str, folder: str = "final") -> str:
    """What `gd_hf.evaluate` / `gd_hf.predict` load for MODEL: a run's output folder -> its export `folder` (said
    on stderr), an export folder or a hub id as given."""
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        chosen = export_folder(path, folder)
        print(f"{model} is a run's output folder: using its {folder}/ export ({chosen})", file=sys.stderr)
        return str(chosen)
    return model


@dataclass(frozen=True)
class ValSet:
    """A run's val set as its recipe names it: a COCO instances JSON and its image folder."""

    run: Path  # the run's output folder
    annotations: Path
    images: Path


def run_of(model: str) -> Path | None:
    """The run's output folder MODEL is or is an export of (it has the `recipe.yaml` the run wrote), else None."""
    path = Path(model)
    for candidate in (path, path.parent):
        if candidate.is_dir() and (candidate / "recipe.yaml").is_file() and (candidate / "checkpoints").exists():
            return candidate
    return None


def run_val_set(model: str) -> ValSet:
    """The val set of the run MODEL is (or is an export of), from its `recipe.yaml`; relative paths as the run was
    launched, from the current folder. An error says what to give instead."""
    run = run_of(model)
    if run is None:
        raise RunFolderError(
            f"{model} is not a run's output folder nor an export inside one (no recipe.yaml beside checkpoints/): "
            "give the annotations and the images"
        )
    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunFolderError(f"{run / 'recipe.yaml'} cannot be read ({e}): give the annotations and the images") from e
    data = recipe.get("data") if isinstance(recipe, dict) else None
    data = data if isinstance(data, dict) else {}
    annotations, images = data.get("val_annotations"), data.get("val_images")
    if not isinstance(annotations, str) or not isinstance(images, str):
        annotations = images = None  # (a hand-edited recipe.yaml: not paths)
    if data.get("source", "coco") != "coco" or not annotations or not images:
        raise RunFolderError(
            f"the run {run} did not read a COCO-format val set (data.source: {data.get('source')}): give the "
            "annotations and the images (a COCO instances JSON and its folder)"
        )
    missing = [f"data.{key}={value}" for key, value in (("val_annotations", annotations), ("val_images", images))
               if not Path(value).exists()]  # fmt: skip
    if missing:
        raise RunFolderError(
            f"the run's recipe ({run / 'recipe.yaml'}) names {', '.join(missing)}, which is not there from "
            f"{Path.cwd()}: run the command from the folder the run was launched in, or give the annotations and "
            "the images"
        )
    return ValSet(run, Path(annotations), Path(images))
