"""Where a run's figures go besides `metrics.jsonl`: Accelerate's trackers, as `train.report_to` chooses.

Each phase gets trackers of its own, writing into its own output folder (TensorBoard: `OUTPUT/tensorboard/`,
MLflow: `OUTPUT/mlruns/`) or run (wandb, trackio: the run's name). What they receive: every `metrics.jsonl`
value under a grouped tag (`tracker_tag`), the resolved recipe with its paths made public as hyperparameters
(`hyperparameters`), and the evaluation pictures where the tracker takes images (`log_pictures`).

Custom trackers (Accelerate's `GeneralTracker` protocol: `name`, `requires_logging_directory`, `tracker`,
`start`, `store_init_configuration`, `log`, optionally `log_images`, `finish`) are passed from Python:
`gd_hf.train.train(recipe, trackers=[MyTracker()])`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker
from PIL import Image

from gd_hf.config.checks import TRACKERS
from gd_hf.config.types import RecipeError

logger = logging.getLogger("gd_hf.train")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def chosen_trackers(report_to: str | list[str]) -> list[str]:
    """The tracker names to log to. The default `tensorboard`, when not installed, is skipped with a warning; any
    other missing package stops the run before any work, naming it."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["none"]:
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if _installed(name)]
    missing = [name for name in names if not _installed(name)]
    if missing == ["tensorboard"] and names == ["tensorboard"]:
        logger.warning("tensorboard is not installed: the metrics go to metrics.jsonl only (pip install tensorboard, "
                       "or train.report_to=none to silence this)")  # fmt: skip
        return []
    if missing:
        raise RecipeError(
            f"train.report_to={report_to!r} needs {', '.join(missing)}, which is not installed: pip install "
            f"{' '.join(missing)} (or choose another tracker, or train.report_to=none)"
        )
    return list(dict.fromkeys(names))


def build_trackers(names: list[str], run_name: str, output_dir: Path) -> list[GeneralTracker]:
    """This phase's trackers (not started: `Accelerator.init_trackers` starts them)."""
    trackers: list[GeneralTracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", output_dir))
        elif name == "wandb":  # needs a login, or WANDB_MODE=offline (wandb's own switch)
            trackers.append(WandBTracker(run_name, name=run_name, dir=str(output_dir)))
        elif name == "mlflow":  # to MLflow's tracking URI (MLFLOW_TRACKING_URI; default ./mlruns); artifacts here
            trackers.append(MLflowTracker(run_name, str(output_dir / "mlruns"), run_name=run_name))
        elif name == "trackio":  # local unless a Space is configured (trackio's own switch)
            trackers.append(TrackioTracker(run_name, name=run_name))
    return trackers


# metrics.jsonl key -> tracker tag: the loss terms and the schedule under train/, the teacher's pseudo labels
# under pseudo/, costs and counters under system/; val/ and teacher_check/ keep their own prefix.
_SYSTEM = ("seconds_per_step", "seconds_since_launch", "seconds_to_first_step", "peak_rss_gb", "nonfinite_steps",
           "data_skipped")  # fmt: skip


def tracker_tag(key: str) -> str:
    """The grouped tag of a `metrics.jsonl` key (`loss_sup` -> `train/loss_sup`, `pseudo_precision` ->
    `pseudo/precision`, `val_teacher/AP` -> `val/teacher_AP`, `eval/forward_s_per_image` -> `system/eval_...`)."""
    if key.startswith(("val/", "teacher_check/")):
        return key
    if key.startswith("val_teacher/"):
        return "val/teacher_" + key.split("/", 1)[1]
    if key.startswith("eval/"):
        return "system/eval_" + key.split("/", 1)[1]
    if key in _SYSTEM:
        return "system/" + key
    if key.startswith("pseudo_label_"):  # pseudo_labels_per_image, pseudo_label_score
        return "pseudo/" + key[len("pseudo_label_") :]
    if key.startswith("pseudo_"):
        return "pseudo/" + key[len("pseudo_") :]
    return "train/" + key


def hyperparameters(recipe: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A (public) resolved recipe as flat scalar hyperparameters: `{"train.lr": 0.0001, "model.backbone_depths":
    "[2, 2, 6, 2]", "ssl.teacher": "null"}` (trackers take scalars and strings only)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{prefix}{key}."))
        elif value is None:
            flat[f"{prefix}{key}"] = "null"
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def log_pictures(trackers: list[GeneralTracker], pictures: dict[str, Image.Image], step: int) -> None:
    """The evaluation pictures to every tracker that takes images (TensorBoard as NHWC arrays, the others as PIL
    images); a tracker without `log_images` is passed over."""
    for tracker in trackers:
        if not callable(getattr(tracker, "log_images", None)):
            continue
        try:
            if isinstance(tracker, TensorBoardTracker):
                arrays = {tag: np.asarray(image.convert("RGB"))[None] for tag, image in pictures.items()}
                tracker.log_images(arrays, step=step, dataformats="NHWC")
            else:
                tracker.log_images({tag: [image] for tag, image in pictures.items()}, step=step)
        except NotImplementedError:
            continue
