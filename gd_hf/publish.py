"""A run's outputs for others: exports (weights, image processor, model card with the metrics) and Hub pushes.

Rank 0 only. A failed push never loses anything local: it is reported at the end of the run (exit code 3) with
the command that pushes again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from gd_hf.config import Recipe
from gd_hf.export import export_model
from gd_hf.model_card import RunSummary
from gd_hf.push import PushError, push_export

logger = logging.getLogger("gd_hf.train")


@dataclass
class Publisher:
    """Writes the run's exports into `output_dir/<name>` and pushes them when the recipe asks."""

    recipe: Recipe
    image_processor: Any
    num_labeled: int
    num_unlabeled: int
    num_val: int
    class_names: list[str]
    teacher_metrics: dict[str, float] | None = None  # the phase-1 teacher's, shown beside the student's
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # extra lines for the model card (the teacher check's figures)

    @classmethod
    def for_run(cls, recipe: Recipe, image_processor: Any, num_labeled: int, num_unlabeled: int, num_val: int,
                class_names: list[str]) -> Publisher:  # fmt: skip
        teacher_results = Path(recipe.ssl.teacher or "") / "eval_results.json"
        teacher_metrics = (
            json.loads(teacher_results.read_text()) if recipe.ssl.enabled and teacher_results.is_file() else None
        )
        return cls(recipe, image_processor, num_labeled, num_unlabeled, num_val, class_names, teacher_metrics)

    def summary(self, step: int, metrics: dict[str, float]) -> RunSummary:
        return RunSummary(
            recipe=self.recipe,
            stage="guided distillation" if self.recipe.ssl.enabled else "supervised",
            step=step,
            metrics=metrics,
            num_labeled=self.num_labeled,
            num_unlabeled=self.num_unlabeled,
            num_val=self.num_val,
            class_names=self.class_names,
            teacher_metrics=self.teacher_metrics,
            notes=list(self.notes),
        )

    def export(
        self,
        model: PreTrainedModel,
        name: str,
        step: int,
        metrics: dict[str, float] | None,
        model_id: str | None = None,
    ) -> Path:
        """`output_dir/name`: the model, its image processor, `eval_results.json` (with `metrics`) and the card."""
        return export_model(
            model,
            self.image_processor,
            Path(self.recipe.output_dir) / name,
            None if metrics is None else {"step": step, **metrics},
            self.summary(step, metrics or {}),
            model_id,
        )

    def push(self, folder: Path, revision: str | None, message: str) -> None:
        """Push `folder`; a failure is kept for the end of the run, the local outputs are complete either way."""
        hub = self.recipe.hub
        try:
            url = push_export(folder, hub.repo_id, revision, hub.private, message, hub.retries)
            logger.info("pushed %s -> %s", folder, url)
        except PushError as e:
            logger.error("%s", e)
            self.failures.append(str(e))

    def push_burn_in_student(self, student: PreTrainedModel, step: int) -> None:
        """At the end of guided burn-in, the student so far is exported and pushed to the `burn-in` branch when
        `hub.push_intermediate`."""
        hub = self.recipe.hub
        if hub.push and hub.push_intermediate:
            folder = self.export(student, "burn_in", step, None, hub.repo_id)
            self.push(folder, "burn-in", f"Student at the end of guided burn-in (step {step})")

    def raise_failures(self) -> None:
        if self.failures:
            raise PushError("\n".join(self.failures))
