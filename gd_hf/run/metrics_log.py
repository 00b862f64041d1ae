"""What a run writes as it goes: `metrics.jsonl` lines (and the trackers), the window of values between two lines,
peak memory, and the AP tables printed on the console."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gd_hf.config import Recipe
from gd_hf.files import write_text_atomic
from gd_hf.run.trackers import tracker_tag

if TYPE_CHECKING:
    from gd_hf.data.prepare import RunData

logger = logging.getLogger("gd_hf.train")

try:
    import resource  # peak memory of this process (POSIX)
except ImportError:  # Windows
    resource = None

# When this process started (the launch, for the time to the first step), from the OS, not from an import.
PROCESS_START = psutil.Process().create_time()


def peak_rss_gb(accelerator: Accelerator) -> float:
    """The largest peak resident memory of any process so far, in GB (the training process itself; DataLoader
    workers are processes of their own)."""
    if resource is not None:  # ru_maxrss: kilobytes on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)
    else:
        peak = psutil.Process().memory_info().peak_wset / 1e9
    mine = torch.tensor([peak], device=accelerator.device)
    return float(accelerator.gather(mine).max()) if accelerator.num_processes > 1 else float(mine)


class LogWindow:
    """The logged values summed since the last log line; the first line of a launch also says how long the
    launch took to reach its first step."""

    def __init__(self, first_of_launch: bool = True) -> None:
        self.sums: dict[str, list[float]] = {}  # key -> [sum, count]
        self.start, self.steps = time.perf_counter(), 0
        self.seconds_to_first_step = time.time() - PROCESS_START if first_of_launch else None

    def record(self, accelerator: Accelerator, counts: dict[str, Any]) -> dict[str, Any]:
        """The window's line: its means over steps and processes, `counts`, speed, memory, start-up time."""
        record = window_means(accelerator, self.sums)
        record.update(
            counts,
            seconds_per_step=(time.perf_counter() - self.start) / self.steps,
            seconds_since_launch=time.time() - PROCESS_START,
            peak_rss_gb=peak_rss_gb(accelerator),
        )
        if self.seconds_to_first_step is not None:
            record["seconds_to_first_step"] = self.seconds_to_first_step
        return record

    def add(self, terms: dict[str, float]) -> None:
        self.steps += 1
        for key, value in terms.items():  # some keys (pseudo-label quality) are not logged every step
            if terms["nonfinite"] or key == "nonfinite":
                continue  # a skipped step's NaN would hide the window's other values
            self.sums.setdefault(key, [0.0, 0])
            self.sums[key][0] += value
            self.sums[key][1] += 1


def window_means(accelerator: Accelerator, window: dict[str, list[float]]) -> dict[str, float]:
    """Each logged value averaged over the steps of the window and over all processes (a key some processes
    lack, like pseudo-label quality without hidden labels, is averaged over those that have it)."""
    windows = gather_object([window]) if accelerator.num_processes > 1 else [window]
    sums: dict[str, list[float]] = {}
    for each in windows:
        for key, (total, count) in each.items():
            sums.setdefault(key, [0.0, 0])
            sums[key][0] += total
            sums[key][1] += count
    return {key: total / count for key, (total, count) in sums.items()}


def log_record(accelerator: Accelerator, path: Path, record: dict[str, Any]) -> None:
    """Append `record` to the metrics log (rank 0) and send it to the trackers."""
    if not accelerator.is_main_process:
        return
    with path.open("a") as f:
        f.write(
            json.dumps(
                {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
            )
            + "\n"
        )
    if accelerator.trackers:  # grouped tags: train/, pseudo/, val/, teacher_check/, system/
        accelerator.log({tracker_tag(k): v for k, v in record.items() if k != "step"}, step=record["step"])


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics log (a torn or foreign line is passed over: this is for pictures)."""
    records = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def bar_figures(logged: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures of a step: the loss, and in phases 2-3 its supervised and unsupervised parts and
    the pseudo labels per image (the health signals of distillation)."""
    figures = {"loss": f"{float(logged['loss']):.3f}"}
    if "loss_unsup" in logged:
        figures.update(sup=f"{float(logged['loss_sup']):.3f}", unsup=f"{float(logged['loss_unsup']):.3f}")
    if "pseudo_labels_per_image" in logged:
        figures["pl/img"] = f"{float(logged['pseudo_labels_per_image']):.1f}"
    return figures


def drop_log_lines_after(path: Path, step: int) -> None:
    """Remove metrics-log lines of steps after `step` (a resumed run repeats those steps), and a torn line (what a
    kill or a full disk leaves in the middle of an append)."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning("%s: dropping line %d, which is not whole (%r)", path, number, line[:80])
            continue
        logged_step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(logged_step, int) or isinstance(logged_step, bool):
            logger.warning("%s: dropping line %d, which has no step (%r)", path, number, line[:80])
            continue
        if logged_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_text_atomic(path, "".join(kept))


def format_metrics(metrics: dict[str, float], step: int) -> str:
    """The AP table printed at the end of a phase."""
    header = " | ".join(f"{k:>6}" for k in metrics)
    values = " | ".join(f"{v:6.2f}" for v in metrics.values())
    return f"val mask AP after {step} steps\n{header}\n{values}"


def side_by_side(teacher: dict[str, float], student: dict[str, float]) -> str:
    """The teacher's and the student's AP tables side by side (the end of a one-launch run)."""
    rows = [f"{'':>9} | {'supervised teacher':>18} | {'distilled student':>17}"]
    rows += [f"{k:>9} | {teacher[k]:18.2f} | {student[k]:17.2f}" for k in student if k in teacher]
    return "val mask AP, side by side\n" + "\n".join(rows)


def log_split_sizes(recipe: Recipe, data: RunData) -> None:
    """The console line with the sizes of the labeled split, the unlabeled stream and val."""
    labeled_count, unlabeled_count = len(data.split.labeled), len(data.split.unlabeled)
    if not recipe.ssl.enabled:
        logger.info(
            "labeled images: %d (of %d), val: %d", labeled_count, labeled_count + unlabeled_count, len(data.val)
        )
        return
    # As the paper (ssl.unlabeled_includes_labeled), the unlabeled stream is every training image.
    included = recipe.ssl.unlabeled_includes_labeled
    logger.info(
        "labeled images: %d, unlabeled stream: %d%s, val: %d",
        labeled_count,
        unlabeled_count + (labeled_count if included else 0),
        " (the labeled ones included)" if included else "",
        len(data.val),
    )
