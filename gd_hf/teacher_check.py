"""Can this teacher teach? Its pseudo labels under the recipe's rules, measured on labeled images before
distilling from it (`ssl.teacher_check`), and the rule that stops a run whose teacher would mostly teach
"no object" or wrong labels.

The images go through the weak view exactly as in distillation (`UnlabeledTrainDataset`), their labels serve
as the truth, and the teacher's predictions are filtered with `filter_pseudo_labels` and matched to the true
objects with `pseudo_label_counts` (same class, mask IoU >= 0.5). `benchmarks/pseudo_label_quality.py` runs the
same measurement over several thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import torch

from gd_hf.config import DataConfig, RecipeError, SslConfig
from gd_hf.data.loading import UnlabeledTrainDataset, collate_unlabeled
from gd_hf.pseudo_labels import filter_pseudo_labels, pseudo_label_counts

logger = logging.getLogger("gd_hf.train")
WRONG_KINDS = ("duplicate", "wrong_class", "mislocated", "background")
# Score thresholds tried for the suggestion (the recipe's own is always measured too).
SUGGESTION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class TeacherCheckError(RecipeError):
    """The teacher would mostly teach "no object" or wrong labels; the message has the figures and what to do."""


@dataclass
class TeacherReport:
    """Pseudo labels of one teacher at one score threshold against the true objects of `images` images."""

    threshold: float
    images: int
    true_objects: int
    pseudo_labels: int
    correct: int
    wrong: dict[str, int] = field(default_factory=dict)  # kind -> count (see `pseudo_label_counts`)

    @property
    def precision(self) -> float:
        return self.correct / self.pseudo_labels if self.pseudo_labels else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.true_objects if self.true_objects else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def figures(self) -> dict[str, float]:
        """Flat figures for metrics.jsonl and the model card."""
        return {
            "images": self.images,
            "score_threshold": self.threshold,
            "pseudo_labels_per_image": self.pseudo_labels / max(self.images, 1),
            "objects_per_image": self.true_objects / max(self.images, 1),
            "precision": self.precision,
            "recall": self.recall,
            **{f"fp_{k}": v / self.pseudo_labels if self.pseudo_labels else 0.0 for k, v in self.wrong.items()},
        }


@torch.no_grad()
def measure_teacher(
    teacher: torch.nn.Module,
    records: datasets.Dataset,
    data: DataConfig,
    ssl: SslConfig,
    divisibility: int,
    max_images: int = 200,
    thresholds: tuple[float, ...] = (),
    batch_size: int = 4,
) -> dict[float, TeacherReport]:
    """Reports at the recipe's score threshold and at each of `thresholds`, over the first `max_images` records
    (labeled ones: their objects are the truth), from one teacher forward pass per batch."""
    rows = min(len(records), max_images)
    dataset = UnlabeledTrainDataset(records.select(range(rows)), data)
    all_thresholds = sorted({ssl.pseudo_label_score_threshold, *thresholds})
    reports = {t: TeacherReport(t, 0, 0, 0, 0, dict.fromkeys(WRONG_KINDS, 0)) for t in all_thresholds}
    was_training, device = teacher.training, next(teacher.parameters()).device
    teacher.eval()
    for start in range(0, rows, batch_size):
        # Key (row, seed = row): a fixed weak view per image, the same in every measurement.
        batch = collate_unlabeled([dataset[(r, r)] for r in range(start, min(start + batch_size, rows))], divisibility)
        outputs = teacher(pixel_values=batch["weak_pixel_values"].to(device))
        for threshold, report in reports.items():
            pseudo = filter_pseudo_labels(
                outputs.class_queries_logits,
                outputs.masks_queries_logits,
                threshold,
                ssl.pseudo_label_min_area,
                ssl.pseudo_label_mask_threshold,
                ssl.pseudo_label_max_overlap,
            )
            counts = pseudo_label_counts(pseudo, batch["hidden_masks"], batch["hidden_classes"])
            report.images += len(batch["image_ids"])
            report.true_objects += counts["objects"]
            report.pseudo_labels += counts["pseudo_labels"]
            report.correct += counts["correct"]
            for kind in WRONG_KINDS:
                report.wrong[kind] += counts[f"fp_{kind}"]
    teacher.train(was_training)
    return reports


def suggested_threshold(reports: dict[float, TeacherReport]) -> TeacherReport:
    """The report whose threshold maximises F1 (a suggestion only: distillation wants precise pseudo labels
    more than complete ones)."""
    return max(reports.values(), key=lambda r: (r.f1, r.threshold))


def verdict(report: TeacherReport, min_precision: float, min_label_ratio: float) -> str | None:
    """Why this teacher should not teach (None if it may): it would mostly hand out wrong labels, or so few that
    the unlabeled images mostly teach "no object"."""
    if report.true_objects == 0:
        return None  # nothing to judge against
    ratio = report.pseudo_labels / report.true_objects
    if ratio < min_label_ratio:
        return (
            f"it hands out {report.pseudo_labels} pseudo labels for {report.true_objects} objects ({ratio:.0%}, "
            f"below {min_label_ratio:.0%}): the unlabeled images would mostly teach 'no object'"
        )
    if report.precision < min_precision:
        return (
            f"only {report.precision:.0%} of its pseudo labels are right (below {min_precision:.0%}): it would "
            "mostly teach wrong labels"
        )
    return None


def report_table(chosen: TeacherReport, best: TeacherReport) -> str:
    """The console table: the recipe's threshold, and the F1-best one as a suggestion."""
    wrong = ", ".join(f"{k.replace('_', ' ')} {chosen.figures()[f'fp_{k}']:.0%}" for k in WRONG_KINDS)
    lines = [
        f"teacher check on {chosen.images} val images (pseudo-label rules of the recipe)",
        "          threshold | labels / image | objects / image | precision | recall |   F1",
    ]
    for label, r in (("recipe", chosen), ("best F1", best)):
        lines.append(
            f"  {label:>8} {r.threshold:9.2f} | {r.pseudo_labels / max(r.images, 1):14.2f} | "
            f"{r.true_objects / max(r.images, 1):15.2f} | {r.precision:9.2f} | {r.recall:6.2f} | {r.f1:5.2f}"
        )
    lines.append(f"  wrong pseudo labels at the recipe's threshold: {wrong}")
    return "\n".join(lines)


def check_teacher(
    teacher: torch.nn.Module, val: datasets.Dataset, recipe, divisibility: int, show: bool = True
) -> dict[str, float] | None:
    """`ssl.teacher_check`: measure the teacher on val, print the table, and stop (or warn) by the rule. Returns
    the figures logged to metrics.jsonl and the student's card (None with `off`)."""
    ssl = recipe.ssl
    if ssl.teacher_check == "off":
        return None
    reports = measure_teacher(teacher, val, recipe.data, ssl, divisibility, ssl.teacher_check_images,
                              SUGGESTION_THRESHOLDS)  # fmt: skip
    chosen, best = reports[ssl.pseudo_label_score_threshold], suggested_threshold(reports)
    if show:
        print(report_table(chosen, best), flush=True)
    figures = {**chosen.figures(), "suggested_score_threshold": best.threshold, "suggested_f1": best.f1}
    problem = verdict(chosen, ssl.teacher_check_min_precision, ssl.teacher_check_min_label_ratio)
    if problem:
        message = (
            f"the teacher {ssl.teacher} should not teach: {problem}. What to do: train it longer "
            "(ssl.teacher_max_steps), start from a pretrained backbone (model.pretrained), or try "
            f"ssl.pseudo_label_score_threshold={best.threshold:g} (F1 {best.f1:.2f} there, against {chosen.f1:.2f} at "
            f"{chosen.threshold:g}; a suggestion). ssl.teacher_check=warn distills anyway; =off skips the check."
        )
        if ssl.teacher_check == "stop":
            raise TeacherCheckError(message)
        logger.warning("%s", message)
    return figures


def teacher_check_note(figures: dict[str, float]) -> str:
    """The check's figures as a line of the student's model card."""
    return (
        f"Teacher check before distillation ({int(figures['images'])} val images, score threshold "
        f"{figures['score_threshold']:g}): {figures['pseudo_labels_per_image']:.2f} pseudo labels per image for "
        f"{figures['objects_per_image']:.2f} objects, precision {figures['precision']:.2f}, recall "
        f"{figures['recall']:.2f}; the F1-best threshold was {figures['suggested_score_threshold']:g}."
    )
