"""Can this teacher teach? Its pseudo labels under the recipe's rules, measured on labeled images before
distilling from it (`ssl.teacher_check`), and the rule that stops a run whose teacher would mostly teach
"no object" or wrong labels.

The images go through the weak view exactly as in distillation (`UnlabeledTrainDataset`), their labels serve
as the truth, and the teacher's predictions go through the run's pseudo-label rule (`gd_hf.method`: the recipe's
`PseudoLabelRules`, or a custom `PseudoLabelRule`) and are matched to the true objects with `pseudo_label_counts`
(same class, mask IoU >= 0.5). `benchmarks/pseudo_label_quality.py` runs the same measurement over several
score thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import torch

from gd_hf.config import DataConfig, RecipeError
from gd_hf.data.loading import UnlabeledTrainDataset, collate_unlabeled
from gd_hf.method.distillation import (
    ModelFamily,
    PseudoLabelRule,
    PseudoLabelRules,
    describe_extension,
    pseudo_labels_problem,
)
from gd_hf.method.pseudo_labels import pseudo_label_counts
from gd_hf.models import family_of

logger = logging.getLogger("gd_hf.train")
WRONG_KINDS = ("duplicate", "wrong_class", "mislocated", "background")
# Score thresholds tried for the suggestion (the recipe's own is always measured too).
SUGGESTION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The sweep `ssl.pseudo_label_score_threshold: auto` chooses from.
AUTO_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95


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
    rule: PseudoLabelRule,
    padding_divisor: int,
    max_images: int = 200,
    thresholds: tuple[float, ...] = (),
    batch_size: int = 4,
    family: ModelFamily | None = None,
) -> dict[float, TeacherReport]:
    """Reports under `rule` (keyed by its `score_threshold`, NaN for a rule without one) and, for
        `PseudoLabelRules`, under the same rules at each of `thresholds`, over the first `max_images` records (labeled
        ones: their objects are the truth), from one teacher forward pass per batch, made as the model `family`'s
    teacher predicts (None: the built-in family of its `model_type`)."""
    family = family if family is not None else family_of(teacher)
    rows = min(len(records), max_images)
    dataset = UnlabeledTrainDataset(records.select(range(rows)), data)
    # Rules whose threshold `auto` has not chosen yet are measured at `thresholds` only.
    unresolved = isinstance(rule, PseudoLabelRules) and rule.score_threshold is None
    rules = {} if unresolved else {rule_threshold(rule): rule}
    if isinstance(rule, PseudoLabelRules):
        rules.update({t: rule.with_score_threshold(t) for t in thresholds if t != rule.score_threshold})
    rules = dict(sorted(rules.items()))
    reports = {t: TeacherReport(t, 0, 0, 0, 0, dict.fromkeys(WRONG_KINDS, 0)) for t in rules}
    was_training, device = teacher.training, next(teacher.parameters()).device
    teacher.eval()
    for start in range(0, rows, batch_size):
        # Key (row, seed = row): a fixed weak view per image, the same in every measurement.
        batch = collate_unlabeled([dataset[(r, r)] for r in range(start, min(start + batch_size, rows))], padding_divisor,
                                  family.black_padding)  # fmt: skip
        predictions = family.predict(teacher, batch["weak_pixel_values"].to(device))
        for threshold, report in reports.items():
            pseudo = rules[threshold](predictions.class_logits, predictions.mask_logits)
            # A custom rule's wrong answer is named here, at the start, as the loop would name it.
            problem = None if type(rules[threshold]) is PseudoLabelRules else pseudo_labels_problem(pseudo, predictions)
            if problem:
                raise TypeError(f"the pseudo-label rule {describe_extension(rules[threshold])} {problem}")
            counts = pseudo_label_counts(pseudo, batch["hidden_masks"], batch["hidden_classes"])
            report.images += len(batch["image_ids"])
            report.true_objects += counts["objects"]
            report.pseudo_labels += counts["pseudo_labels"]
            report.correct += counts["correct"]
            for kind in WRONG_KINDS:
                report.wrong[kind] += counts[f"fp_{kind}"]
    teacher.train(was_training)
    return reports


# The key of a custom rule's report (one without a score threshold); one object, so that it finds itself.
NO_THRESHOLD = float("nan")


def rule_threshold(rule: PseudoLabelRule) -> float:
    """The score threshold of a pseudo-label rule (`NO_THRESHOLD` for a custom rule without one)."""
    threshold = getattr(rule, "score_threshold", None)
    return NO_THRESHOLD if threshold is None else float(threshold)


def suggested_threshold(reports: dict[float, TeacherReport]) -> TeacherReport:
    """The report whose threshold maximises F1 (a suggestion only: distillation wants precise pseudo labels
    more than complete ones)."""
    return max(reports.values(), key=lambda r: (r.f1, r.threshold))


def choose_threshold(reports: dict[float, TeacherReport], target_precision: float) -> TeacherReport | None:
    """`ssl.pseudo_label_score_threshold: auto`: the report of the lowest threshold whose pseudo labels reach
    `target_precision` (the most pseudo labels at that precision: a lower threshold only adds labels); None when
    no threshold of the sweep reaches it (or hands out any pseudo label)."""
    reaching = [r for r in reports.values() if r.pseudo_labels and r.precision >= target_precision]
    return min(reaching, key=lambda r: r.threshold) if reaching else None


def sweep_table(reports: dict[float, TeacherReport], chosen: float | None = None) -> str:
    """Every threshold of the sweep, one line each, the chosen one marked (the figures `auto` chose on)."""
    lines = ["  threshold | labels / image | precision | recall |   F1"]
    for t, r in sorted(reports.items()):
        mark = "  <- chosen" if chosen is not None and t == chosen else ""
        lines.append(f"  {t:9.2f} | {r.pseudo_labels / max(r.images, 1):14.2f} | {r.precision:9.2f} | "
                     f"{r.recall:6.2f} | {r.f1:5.2f}{mark}")  # fmt: skip
    return "\n".join(lines)


def sweep_figures(reports: dict[float, TeacherReport]) -> dict[str, float]:
    """The sweep as flat metrics.jsonl figures: `precision_at_0.45`, `recall_at_0.45`, `labels_per_image_at_0.45`
    (no `@`: MLflow refuses it in a metric name)."""
    figures = {}
    for t, r in sorted(reports.items()):
        figures.update({f"precision_at_{t:g}": r.precision, f"recall_at_{t:g}": r.recall,
                        f"labels_per_image_at_{t:g}": r.pseudo_labels / max(r.images, 1)})  # fmt: skip
    return figures


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
    teacher: torch.nn.Module, val: datasets.Dataset, recipe, padding_divisor: int, show: bool = True,
    rule: PseudoLabelRule | None = None, family: ModelFamily | None = None,
) -> dict[str, float] | None:  # fmt: skip
    """`ssl.teacher_check`: measure the teacher on val under the run's pseudo-label `rule` (None: the recipe's
    `PseudoLabelRules`; the teacher predicts as `family`'s does), print the table, and stop (or warn) by the
    verdict. Returns the figures logged to metrics.jsonl and the student's card (None with `off`).

    With `ssl.pseudo_label_score_threshold: auto` the threshold is chosen here (`choose_threshold` over
    `AUTO_THRESHOLDS`): `score_threshold` in the figures is the chosen one (`score_threshold_auto` 1), the sweep
    it was chosen on is in them too (`precision@0.45`, ...), and the verdict judges it. A teacher whose pseudo
    labels reach `ssl.pseudo_label_target_precision` at no threshold stops the run (with `warn`: its most precise
    threshold is taken, with a warning)."""
    ssl = recipe.ssl
    if ssl.teacher_check == "off":
        return None
    rule = rule if rule is not None else PseudoLabelRules.from_recipe(ssl)
    auto = ssl.pseudo_label_score_threshold == "auto"
    if auto and not (isinstance(rule, PseudoLabelRules) and rule.score_threshold is None):
        raise RecipeError(
            "ssl.pseudo_label_score_threshold is `auto`, which needs the recipe's pseudo-label rules: a custom "
            "pseudo_label_rule has no score threshold to choose; give the recipe a number"
        )
    reports = measure_teacher(teacher, val, recipe.data, rule, padding_divisor, ssl.teacher_check_images,
                              AUTO_THRESHOLDS if auto else SUGGESTION_THRESHOLDS, family=family)  # fmt: skip
    best = suggested_threshold(reports)
    if auto:
        chosen = choose_threshold(reports, ssl.pseudo_label_target_precision)
        if chosen is None:
            images = next(iter(reports.values())).images
            message = (
                f"the teacher {ssl.teacher} should not teach: its pseudo labels reach the target precision "
                f"{ssl.pseudo_label_target_precision:g} (ssl.pseudo_label_target_precision) at no score threshold "
                f"from {AUTO_THRESHOLDS[0]:g} to {AUTO_THRESHOLDS[-1]:g} on {images} val images:\n"
                f"{sweep_table(reports)}\nWhat to do: train it longer (ssl.teacher_max_steps), start from a "
                "pretrained backbone (model.pretrained), or lower ssl.pseudo_label_target_precision to what the "
                "sweep shows it can reach (the F1-best threshold is "
                f"{best.threshold:g}: precision {best.precision:.2f}, recall {best.recall:.2f}). "
                "ssl.teacher_check=warn distills anyway at its most precise threshold."
            )
            if ssl.teacher_check == "stop":
                raise TeacherCheckError(message)
            if show:
                logger.warning("%s", message)
            chosen = max(reports.values(), key=lambda r: (r.precision, -r.threshold))
        if show:
            print(f"teacher check on {chosen.images} val images: ssl.pseudo_label_score_threshold=auto chose "
                  f"{chosen.threshold:g}, the lowest threshold whose pseudo labels reach precision "
                  f"{ssl.pseudo_label_target_precision:g}\n{sweep_table(reports, chosen.threshold)}", flush=True)  # fmt: skip
    else:
        chosen = reports[rule_threshold(rule)]
        if show:
            print(report_table(chosen, best), flush=True)
    figures = {**chosen.figures(), "suggested_score_threshold": best.threshold, "suggested_f1": best.f1}
    if auto:
        reached = chosen.pseudo_labels > 0 and chosen.precision >= ssl.pseudo_label_target_precision
        figures.update(score_threshold_auto=1.0, target_precision=ssl.pseudo_label_target_precision,
                       target_reached=float(reached), **sweep_figures(reports))  # fmt: skip
    if not isinstance(rule, PseudoLabelRules):  # a custom rule: no threshold, no suggestion (and no NaN logged)
        figures = {
            k: v
            for k, v in figures.items()
            if k not in ("score_threshold", "suggested_score_threshold", "suggested_f1")
        }
    problem = judge(chosen, best, rule, ssl, auto, show)
    # A teacher that failed and distills anyway (`ssl.teacher_check: warn`) is said so on the card, not shown as
    # an ordinary precision figure.
    figures["passed"] = float(problem is None and figures.get("target_reached", 1.0) == 1.0)
    return figures


def judge(chosen: TeacherReport, best: TeacherReport, rule: PseudoLabelRule, ssl, auto: bool, show: bool) -> str | None:
    """The check's verdict on the `chosen` threshold's report: a teacher that should not teach stops the run
    (`ssl.teacher_check: stop`) or is warned about (`warn`), with what to try (`best`: the F1-best threshold).
    Returns the problem (None: it may teach)."""
    problem = verdict(chosen, ssl.teacher_check_min_precision, ssl.teacher_check_min_label_ratio)
    if not problem:
        return None
    if auto:
        suggestion = f"lower ssl.pseudo_label_target_precision (auto chose {chosen.threshold:g})"
    elif isinstance(rule, PseudoLabelRules):
        suggestion = (
            f"try ssl.pseudo_label_score_threshold={best.threshold:g} (F1 {best.f1:.2f} there, against "
            f"{chosen.f1:.2f} at {chosen.threshold:g}; a suggestion), or =auto"
        )
    else:
        suggestion = "try another pseudo-label rule"
    message = (
        f"the teacher {ssl.teacher} should not teach: {problem}. What to do: train it longer "
        f"(ssl.teacher_max_steps), start from a pretrained backbone (model.pretrained), or {suggestion}. "
        "ssl.teacher_check=warn distills anyway; =off skips the check."
    )
    if ssl.teacher_check == "stop":
        raise TeacherCheckError(message)
    if show:  # (every process measures; one says so)
        logger.warning("%s", message)
    return problem


def teacher_check_note(figures: dict[str, float]) -> str:
    """The check's figures as a line of the student's model card (a failed check first, in so many words)."""
    custom = "score_threshold" not in figures  # a custom rule (see `check_teacher`)
    rule = "a custom pseudo-label rule" if custom else f"score threshold {figures['score_threshold']:g}"
    best = "" if custom else f"; the F1-best threshold was {figures['suggested_score_threshold']:g}"
    note = (
        f"Teacher check before distillation ({int(figures['images'])} val images, {rule}): "
        f"{figures['pseudo_labels_per_image']:.2f} pseudo labels per image for {figures['objects_per_image']:.2f} "
        f"objects, precision {figures['precision']:.2f}, recall {figures['recall']:.2f}{best}."
    )
    if figures.get("score_threshold_auto"):
        sweep = ", ".join(
            f"{t:g}: {figures[f'precision_at_{t:g}']:.2f} / {figures[f'recall_at_{t:g}']:.2f}"
            for t in AUTO_THRESHOLDS
            if f"precision_at_{t:g}" in figures
        )
        if figures.get("target_reached", 1.0):
            how = (f"the lowest of {AUTO_THRESHOLDS[0]:g}-{AUTO_THRESHOLDS[-1]:g} whose pseudo labels reached "
                   f"precision {figures['target_precision']:g} on these images")  # fmt: skip
        else:
            how = (f"no threshold of {AUTO_THRESHOLDS[0]:g}-{AUTO_THRESHOLDS[-1]:g} reached the target precision "
                   f"{figures['target_precision']:g} on these images, and with `ssl.teacher_check: warn` the run "
                   "distilled at the most precise one")  # fmt: skip
        note += (
            f" The threshold was chosen by `ssl.pseudo_label_score_threshold: auto`: {how} (precision / recall "
            f"per threshold: {sweep})."
        )
    if figures.get("passed", 1.0) == 0.0:
        note = ("**The teacher failed this check** (its pseudo labels were too few or too often wrong by the "
                "recipe's `ssl.teacher_check_*` limits) and the run distilled anyway (`ssl.teacher_check: warn`). "
                + note)  # fmt: skip
    return note
