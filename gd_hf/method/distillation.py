"""Guided Distillation (Berrada et al., "Guided Distillation for Semi-Supervised Instance Segmentation",
arXiv 2308.02668), on one screen or two; the numbers and the reference code's choices are in
`../shared/docs/method.md`.

The phases are a pure function of the step (`GuidedDistillation.phase`), so a resumed run is in the same one:
1. `supervised`: the teacher trains on the labeled split alone (a run with `ssl.enabled: false`);
2. `burn_in` (steps < `ssl.burn_in_steps`): the student trains on labeled images plus the pseudo labels of the
   *fixed* phase-1 teacher;
3. `ema`: at its first step the teacher becomes a copy of the student, then follows it by EMA after each update.

One micro-batch (`GuidedDistillation.loss`): the labeled and unlabeled batches are padded to one frame; the
teacher predicts on the weak view and a `PseudoLabelRule` turns that into targets; the student sees the labeled
images and the strong view in one forward pass; the loss is `L_sup + ssl.unsup_loss_weight * L_unsup`, both the
model family's matched (Hungarian) loss. Without pseudo labels (phase 1, or a burn-in without them) it is L_sup.

Two extension points, plain classes passed in from Python (docs/method.md, "Extending the method"):
- `PseudoLabelRule`: the teacher's logits -> `PseudoLabels` (`PseudoLabelRules`: the paper's four rules and an
  optional mask NMS);
- `ModelFamily` (`gd_hf.models.protocol`): what the method, and the run around it, need of a model family
  (`gd_hf.models.mask2former.Mask2FormerFamily`, `gd_hf.models.eomt.EomtFamily`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gd_hf.config import SslConfig
from gd_hf.data.loading import frame_size, pad_batch
from gd_hf.method.pseudo_labels import PseudoLabels, filter_pseudo_labels, pseudo_label_quality
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models.protocol import ModelFamily, Predictions

# The matched loss's main terms, logged per step (the auxiliary layers' terms are in the loss, not the log).
LOGGED_LOSS_TERMS = ("loss_cross_entropy", "loss_mask", "loss_dice")


class PseudoLabelRule(Protocol):
    """The teacher's predictions on a batch of weak views -> the student's targets."""

    def __call__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> PseudoLabels:
        """class_logits (B, Q, C+1), mask_logits (B, Q, h, w) -> per image hard masks, classes and scores."""


@dataclass(frozen=True)
class PseudoLabelRules:
    """The paper's pseudo-label rules (see `filter_pseudo_labels`): drop "no object", keep a score above
    `score_threshold` and a soft mask area above `min_soft_area` pixels, binarise at `mask_threshold`; plus two
    of ours, off by default: a hard mask of at least `min_mask_pixels` pixels (0 = off) and the mask NMS
    `max_overlap` (None = off).

    `score_threshold` None is `ssl.pseudo_label_score_threshold: auto` before the teacher check has chosen it
    (`gd_hf.method.teacher_check.choose_threshold`): such rules refuse to make pseudo labels."""

    score_threshold: float | None = 0.7
    min_soft_area: float = 5.0
    mask_threshold: float = 0.5
    max_overlap: float | None = None
    min_mask_pixels: int = 0

    @classmethod
    def from_recipe(cls, ssl: SslConfig) -> PseudoLabelRules:
        threshold = ssl.pseudo_label_score_threshold
        return cls(None if threshold == "auto" else threshold, ssl.pseudo_label_min_area,
                   ssl.pseudo_label_mask_threshold, ssl.pseudo_label_max_overlap,
                   ssl.pseudo_label_min_mask_pixels)  # fmt: skip

    def with_score_threshold(self, threshold: float) -> PseudoLabelRules:
        return dataclasses.replace(self, score_threshold=threshold)

    def __call__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> PseudoLabels:
        if self.score_threshold is None:
            raise RuntimeError(
                "ssl.pseudo_label_score_threshold is `auto` and no threshold has been chosen yet: the teacher check "
                "chooses it (gd_hf.method.teacher_check.check_teacher) before the first pseudo label"
            )
        return filter_pseudo_labels(class_logits, mask_logits, self.score_threshold, self.min_soft_area,
                                    self.mask_threshold, self.max_overlap, self.min_mask_pixels)  # fmt: skip


@dataclass(frozen=True)
class StepStart:
    """What `GuidedDistillation.start_step` did before a step: whether burn-in has just ended (the teacher is now
    the student's copy), and the model family's scheduled figures for the step (to log)."""

    burn_in_ended: bool
    scheduled: dict[str, float]


class GuidedDistillation:
    """The method: its teacher (frozen in burn-in, then the EMA of the student), its pseudo-label rule, its
    schedule, and the loss of a micro-batch. Needs no Accelerator: the loop calls `start_step`, `loss` (inside
    its autocast, once per micro-batch) and `after_step`.

    With `ssl.enabled: false` (phase 1) there is no teacher and `loss` is the supervised loss alone."""

    def __init__(
        self, ssl: SslConfig, family: ModelFamily, teacher: EmaTeacher | None = None,
        rule: PseudoLabelRule | None = None,
    ) -> None:  # fmt: skip
        if ssl.enabled and teacher is None:
            raise ValueError("Guided Distillation (ssl.enabled) needs a teacher")
        self.ssl, self.family, self.teacher = ssl, family, teacher
        self.rule = rule if rule is not None else PseudoLabelRules.from_recipe(ssl)

    @classmethod
    def supervised(cls, family: ModelFamily) -> GuidedDistillation:
        """Phase 1 alone: the supervised loss, no teacher."""
        return cls(SslConfig(enabled=False), family)

    def phase(self, step: int) -> str:
        """`supervised`, `burn_in` or `ema` for the step about to run (0-based)."""
        if not self.ssl.enabled:
            return "supervised"
        return "burn_in" if step < self.ssl.burn_in_steps else "ema"

    def phase_starts(self, max_steps: int) -> list[tuple[int, str]]:
        """The first step of each phase a run of `max_steps` steps goes through, with the phase (`phase`)."""
        starts = sorted({0, min(self.ssl.burn_in_steps, max_steps)} if self.ssl.enabled else {0})
        return [(step, self.phase(step)) for step in starts if step < max_steps]

    def uses_pseudo_labels(self, step: int) -> bool:
        """Whether the step's loss has the unsupervised term (a burn-in may run on labeled data only)."""
        phase = self.phase(step)
        return phase == "ema" or (phase == "burn_in" and self.ssl.burn_in_pseudo_labels)

    def start_step(self, step: int, student: torch.nn.Module) -> StepStart:
        """Before `step`: at the first EMA step the teacher becomes a copy of the student (burn-in has just
        ended); then the model family's schedule for the step (`ModelFamily.start_step`), whose figures the
        step's loss logs."""
        phase = self.phase(step)
        burn_in_ended = phase == "ema" and step == self.ssl.burn_in_steps
        if burn_in_ended:
            self.teacher.copy_from(student)
        teacher = self.teacher.model if self.teacher is not None else None
        return StepStart(burn_in_ended, self.family.start_step(step, phase, student, teacher))

    def loss(
        self, model: torch.nn.Module, student: torch.nn.Module, labeled: dict[str, Any],
        unlabeled: dict[str, Any] | None, device: torch.device | str = "cpu",
        observe: Callable[[dict[str, Any], PseudoLabels], None] | None = None,
        scheduled: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:  # fmt: skip
        """The loss of one micro-batch and the values to log. `model` is what the forward pass calls (DDP-wrapped
        on several processes), `student` the unwrapped model; `unlabeled` (None: supervised only) carries the
        weak and strong views of the same images. `observe(unlabeled, pseudo_labels)`, if given, sees the
        unlabeled batch in the loss's frame and the pseudo labels it is taught (the evaluation's picture);
        `scheduled`: the step's figures of `start_step`, logged with the loss."""
        pseudo = None
        if unlabeled is not None:
            # One frame for both batches before the teacher sees the weak view: its pseudo labels then lie in
            # the frame of the student's input, as the labeled targets do (see `pad_batch`).
            labeled, unlabeled = one_frame(labeled, unlabeled)
            pseudo = self.pseudo_labels(unlabeled["weak_pixel_values"].to(device))
            if observe is not None:
                observe(unlabeled, pseudo)
        pixel_values = labeled["pixel_values"].to(device)
        labeled_count = pixel_values.shape[0]
        if pseudo is not None:  # the labeled images and the strong views in one forward pass (one DDP forward)
            pixel_values = torch.cat([pixel_values, unlabeled["strong_pixel_values"].to(device)])
        predictions = self.family.forward(model, pixel_values)
        labeled_rows = slice(0, labeled_count) if pseudo is not None else slice(None)
        terms = self.family.loss(student, predictions.rows(labeled_rows), [m.to(device) for m in labeled["mask_labels"]],
                                 [c.to(device) for c in labeled["class_labels"]])  # fmt: skip
        loss = sum(terms.values())
        logged: dict[str, torch.Tensor | float] = {}
        if pseudo is not None:
            weight = self.ssl.unsup_no_object_weight  # passed only when set: a custom family may not know it
            unsup_terms = self.family.loss(student, predictions.rows(slice(labeled_count, None)), pseudo.mask_labels,
                                           pseudo.class_labels,
                                           **({} if weight is None else {"no_object_weight": weight}))  # fmt: skip
            unsup_loss = sum(unsup_terms.values())
            logged.update(loss_sup=loss, loss_unsup=unsup_loss)
            loss = loss + self.ssl.unsup_loss_weight * unsup_loss
        logged["loss"] = loss
        logged.update({key: terms[key] for key in LOGGED_LOSS_TERMS})
        logged.update(scheduled or {})
        if pseudo is not None:
            with torch.autocast(pixel_values.device.type, enabled=False):  # monitoring counts, in full precision
                logged.update(pseudo_label_figures(pseudo, unlabeled))
        return loss, logged

    def pseudo_labels(self, weak_pixel_values: torch.Tensor) -> PseudoLabels:
        """The teacher's predictions on the weak view (in the loop's autocast, as the student's), through the
        pseudo-label rule in full precision (mask NMS's overlaps are pixel counts: bf16 would round them)."""
        with torch.no_grad():
            predictions = self.family.teacher_predict(self.teacher.model, weak_pixel_values)
            with torch.autocast(weak_pixel_values.device.type, enabled=False):
                pseudo = self.rule(predictions.class_logits, predictions.mask_logits)
        # A custom rule's mistake is named at its first step rather than deep in the matcher. (The recipe's own
        # rules fit by construction: their answers are not checked, which costs a host sync per step.)
        problem = None if type(self.rule) is PseudoLabelRules else pseudo_labels_problem(pseudo, predictions)
        if problem:
            raise TypeError(f"the pseudo-label rule {describe_extension(self.rule)} {problem}")
        return pseudo

    def after_step(self, step: int, student: torch.nn.Module, update_skipped: bool) -> None:
        """After the optimizer step of `step`: in the EMA phase, teacher <- decay * teacher + (1 - decay) * student
        (a skipped update moves neither)."""
        if self.phase(step) == "ema" and not update_skipped:
            self.teacher.update(student, self.ssl.ema_decay)


FAMILY_METHODS = ("forward", "loss", "padding_divisor", "predict", "teacher_predict", "start_step", "load_pretrained",
                  "recipe_problems", "build_model", "image_processor", "lr_scale", "exported", "input_size_problem",
                  "card", "usage_snippet")  # fmt: skip


def check_extension_points(rule: object | None, family: object | None, ssl: SslConfig | None = None) -> None:
    """Refuse, before any work, a pseudo-label rule that cannot be called or a model family without the
    `ModelFamily` methods (a `TypeError` naming what is missing), or whose `loss` cannot take the
    `no_object_weight` that `ssl.unsup_no_object_weight` asks for."""
    if rule is not None and not callable(rule):
        raise TypeError(f"pseudo_label_rule must be callable (class_logits, mask_logits) -> PseudoLabels, got {rule!r}")
    missing = [name for name in FAMILY_METHODS if family is not None and not callable(getattr(family, name, None))]
    if family is not None and not isinstance(getattr(family, "black_padding", None), bool):
        missing.append("black_padding (a bool attribute)")
    for attribute in ("name", "display_name"):
        if family is not None and not isinstance(getattr(family, attribute, None), str):
            missing.append(f"{attribute} (a str attribute)")
    if family is not None and not isinstance(getattr(family, "scheduled_buffers", None), tuple):
        missing.append("scheduled_buffers (a tuple of buffer names)")
    if missing:
        raise TypeError(f"model_family {type(family).__name__} lacks the ModelFamily method(s) {', '.join(missing)} "
                        "(gd_hf.models.protocol; a family that changes only some of a built-in's subclasses it, e.g. "
                        "gd_hf.models.mask2former.Mask2FormerFamily)")  # fmt: skip
    if family is not None and ssl is not None and ssl.enabled and ssl.unsup_no_object_weight is not None:
        parameters = inspect.signature(family.loss).parameters.values()
        if not any(p.name == "no_object_weight" or p.kind is p.VAR_KEYWORD for p in parameters):
            raise TypeError(
                f"ssl.unsup_no_object_weight is set but model_family {type(family).__name__}.loss takes no "
                "`no_object_weight` keyword (see ModelFamily.loss): add it, or leave the key at null"
            )


def pseudo_labels_problem(pseudo: object, predictions: Predictions) -> str | None:
    """What is wrong with a rule's answer for these predictions (None: nothing): `PseudoLabels` with, per image of
    the batch, masks (N, h, w) at the teacher's mask resolution, N integer classes below "no object", N scores."""
    if not isinstance(pseudo, PseudoLabels):
        return f"returned a {type(pseudo).__name__}, not PseudoLabels"
    batch, no_object = predictions.class_logits.shape[0], predictions.class_logits.shape[-1] - 1
    size = tuple(predictions.mask_logits.shape[-2:])
    if not len(pseudo.mask_labels) == len(pseudo.class_labels) == len(pseudo.scores) == batch:
        return f"returned lists of {len(pseudo.mask_labels)}/{len(pseudo.class_labels)}/{len(pseudo.scores)} for {batch} images"
    for i, (masks, classes, scores) in enumerate(zip(pseudo.mask_labels, pseudo.class_labels, pseudo.scores)):
        if masks.dim() != 3 or tuple(masks.shape[-2:]) != size or not len(masks) == len(classes) == len(scores):
            return (
                f"gave image {i} masks {tuple(masks.shape)} for {len(classes)} classes and {len(scores)} scores "
                f"(masks (N, {size[0]}, {size[1]}) expected)"
            )
    classes = torch.cat([c.flatten() for c in pseudo.class_labels])
    if classes.is_floating_point() or (len(classes) and not 0 <= int(classes.min()) <= int(classes.max()) < no_object):
        return f"gave classes {classes.tolist()[:10]}: integers in [0, {no_object}) expected"
    for i, (masks, scores) in enumerate(zip(pseudo.mask_labels, pseudo.scores)):
        # Soft or NaN masks are not targets: the matched loss trains on them anyway (a loss far below 0).
        if masks.numel() and not bool(((masks == 0) | (masks == 1)).all()):
            return f"gave image {i} masks with values other than 0 and 1 (hard masks expected, e.g. `soft > 0.5`)"
        if scores.numel() and not bool(torch.isfinite(scores).all()):
            return f"gave image {i} non-finite scores"
    return None


def describe_extension(extension: object) -> str:
    """What a checkpoint records of a custom extension point, for a relaunch to compare: its class and its plain
    settings, e.g. `my_rules.TopKPerImage(k=1, rules=PseudoLabelRules(score_threshold=0.5, ...))`."""
    cls = type(extension)
    settings = {k: v for k, v in sorted(getattr(extension, "__dict__", {}).items()) if _plain(v)}
    return f"{cls.__module__}.{cls.__qualname__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def _plain(value: object) -> bool:
    """A value whose repr is the same in every launch (no object addresses, no tensors)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_plain(getattr(value, f.name)) for f in dataclasses.fields(value))
    return isinstance(value, (bool, int, float, str, type(None)))


def one_frame(labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A labeled and an unlabeled batch padded to one frame (the larger of the two, side by side), images and
    targets alike (see `pad_batch`)."""
    (lh, lw), (uh, uw) = frame_size(labeled), frame_size(unlabeled)
    height, width = max(lh, uh), max(lw, uw)
    return pad_batch(labeled, height, width), pad_batch(unlabeled, height, width)


def pseudo_label_figures(pseudo: PseudoLabels, unlabeled: dict[str, Any]) -> dict[str, float]:
    """What is logged of a step's pseudo labels: how many per image, their mean score, and, when the unlabeled
    images carry hidden labels (synthetic data, ablations), their quality against those (monitoring only: the
    hidden labels never become targets)."""
    counts = pseudo.counts()
    all_scores = torch.cat(pseudo.scores)
    figures = {
        "pseudo_labels_per_image": sum(counts) / len(counts),
        "pseudo_label_score": float(all_scores.mean()) if len(all_scores) else 0.0,
    }
    if pseudo.small_masks is not None:  # empty or tiny hard masks: kept (rule off) or dropped (see PseudoLabels)
        figures["pseudo_labels_small_mask_per_image"] = sum(pseudo.small_masks) / len(counts)
    if any(len(c) for c in unlabeled["hidden_classes"]):
        quality = pseudo_label_quality(pseudo, unlabeled["hidden_masks"], unlabeled["hidden_classes"])
        figures.update({f"pseudo_{key}": value for key, value in quality.items() if value == value})  # not NaN
    return figures
