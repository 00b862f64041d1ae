"""A run's outputs for others: exports (weights, image processor, model card with the metrics) and Hub pushes.

Rank 0 only. A failed push never loses anything local: it is reported at the end of the run (exit code 3) with
the command that pushes again.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel

from gd_hf.config import Recipe
from gd_hf.hub.export import export_model
from gd_hf.hub.model_card import RunSummary, card_facts
from gd_hf.hub.public import is_hub_id, public_launches, public_recipe, public_value, run_name
from gd_hf.hub.push import PushError, push_export, record_push
from gd_hf.hub.space import SpaceError, push_space, write_space
from gd_hf.models import ModelFamily
from gd_hf.run.launches import read_launches

logger = logging.getLogger("gd_hf.train")


# The framework versions a card names (their versions on this machine).
CARD_PACKAGES = ("gd_hf", "transformers", "torch", "accelerate", "datasets", "huggingface_hub")


def framework_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in CARD_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["Python"] = platform.python_version()
    return versions


@dataclass
class Publisher:
    """Writes the run's exports into `output_dir/<name>` and pushes them when the recipe asks.

    An export holds what a Hub visitor needs and nothing of this machine: the model and image processor,
    `eval_results.json` (the metrics and how they were measured), the card, `recipe.yaml` (the launch's recipe,
    paths made public), `run_info.json` (the launches: versions, processes; no command line or host),
    `examples/` (val images the card's snippet and a Space use) and the pictures (`predictions.png`, `curves.png`).
    """

    recipe: Recipe
    image_processor: Any
    num_labeled: int
    num_unlabeled: int
    num_val: int
    class_names: list[str]
    teacher_metrics: dict[str, float] | None = None  # the phase-1 teacher's, shown beside the student's
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # extra lines for the model card (the teacher check's figures)
    launch_recipe: Recipe | None = None  # what the run was launched with (what trains it again); None: `recipe`
    examples: dict[str, bytes] = field(default_factory=dict)  # examples/<name> -> image file
    pictures: dict[str, bytes] = field(default_factory=dict)  # predictions.png, curves.png -> PNG (the newest)
    family: ModelFamily | None = None  # the run's model family (None: the built-in one `model.family` names)

    @classmethod
    def for_run(cls, recipe: Recipe, image_processor: Any, num_labeled: int, num_unlabeled: int, num_val: int,
                class_names: list[str], launch_recipe: Recipe | None = None,
                family: ModelFamily | None = None) -> Publisher:  # fmt: skip
        teacher_results = Path(recipe.ssl.teacher or "") / "eval_results.json"
        teacher_metrics = (
            json.loads(teacher_results.read_text()) if recipe.ssl.enabled and teacher_results.is_file() else None
        )
        if teacher_metrics is not None:  # the figures only (not how they were measured)
            teacher_metrics = {k: v for k, v in teacher_metrics.items() if isinstance(v, (int, float))}
        return cls(recipe, image_processor, num_labeled, num_unlabeled, num_val, class_names, teacher_metrics,
                   launch_recipe=launch_recipe, family=family)  # fmt: skip

    @property
    def published_recipe(self) -> dict[str, Any]:
        return public_recipe(self.launch_recipe or self.recipe)

    def evaluated_with(self) -> dict[str, Any]:
        """How the exported metrics were measured (what `gd_hf.evaluate` uses by default)."""
        max_images = self.recipe.eval.max_images
        return {"top_k": self.recipe.eval.top_k, "images": min(self.num_val, max_images or self.num_val),
                "max_images": max_images, "shortest_edge": self.recipe.data.eval_shortest_edge,
                "longest_edge": self.recipe.data.eval_longest_edge}  # fmt: skip

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
            name=run_name(self.recipe),
            published_recipe=self.published_recipe,
            evaluated_with=self.evaluated_with(),
            examples=[f"examples/{example}" for example in sorted(self.examples)],
            pictures=sorted(self.pictures),
            versions=framework_versions(),
            base_model=self.recipe.model.pretrained if is_hub_id(self.recipe.model.pretrained) else None,
            family=self.family,
        )

    def public_model_path(self, name: str) -> str:
        """How a card refers to the export `name` when it has no hub id: its path without this machine's folders
        (`outputs/demo/final` as given; `run/final` for an absolute output_dir)."""
        path = public_value(str(Path(self.recipe.output_dir) / name), self.recipe)
        return path if path.startswith((".", "/", "{")) else f"./{path}"  # `outputs/x` could read as a hub id

    def export(
        self,
        model: PreTrainedModel,
        name: str,
        step: int,
        metrics: dict[str, float] | None,
        model_id: str | None = None,
    ) -> Path:
        """`output_dir/name`: the model, its image processor, `eval_results.json` (with `metrics`), the card and
        the published files."""
        launches = read_launches(self.recipe.output_dir)
        summary = self.summary(step, metrics or {})
        files = {
            "recipe.yaml": yaml.safe_dump(self.published_recipe, sort_keys=False).encode(),
            "run_info.json": self.run_info(launches, summary),
            **{f"examples/{example}": content for example, content in self.examples.items()},
            **self.pictures,
        }
        results = None if metrics is None else {"step": step, **metrics, "evaluated_with": self.evaluated_with()}
        return export_model(
            model,
            self.image_processor,
            Path(self.recipe.output_dir) / name,
            results,
            summary,
            model_id or self.public_model_path(name),
            files,
            self.family,
        )

    def run_info(self, launches: list[dict[str, Any]], summary: RunSummary) -> bytes:
        """The export's `run_info.json`: the launches as published, and the card's facts (`card_for_repo`)."""
        record = {"launches": public_launches(launches, self.recipe), "card": card_facts(summary)}
        return (json.dumps(record, indent=2) + "\n").encode()

    def push(self, folder: Path, revision: str | None, message: str) -> bool:
        """Push `folder`; a failure is kept for the end of the run, the local outputs are complete either way.
        Whether it was pushed (then its `run_info.json` says where: a later run's card names it by that id)."""
        hub = self.recipe.hub
        try:
            url = push_export(folder, hub.repo_id, revision, hub.private, message, hub.retries)
            logger.info("pushed %s -> %s", folder.name, url)
        except PushError as e:
            logger.error("%s", e)
            self.failures.append(str(e))
            return False
        record_push(folder, hub.repo_id, revision)
        return True

    def push_space(self, final: Path) -> None:
        """After the final push: a Gradio Space serving the pushed model (`gd_hf.hub.space`), written into
        `output_dir/space` and pushed to `hub.space_repo`; a failure is kept for the end of the run."""
        hub = self.recipe.hub
        out = Path(self.recipe.output_dir) / "space"
        again = f"python -m gd_hf.space {final} {out} --model-id {hub.repo_id} --push {hub.space_repo}"
        try:
            write_space(str(final), out, model_id=hub.repo_id, title=run_name(self.recipe))
            url = push_space(out, hub.space_repo, hub.private, again=again)
            logger.info("pushed the Space -> %s", url)
        except (SpaceError, PushError) as e:
            logger.error("the Space for %s: %s", hub.repo_id, e)
            self.failures.append(f"the Space {hub.space_repo} failed: {e}. Again: {again}")

    def push_burn_in_student(self, student: PreTrainedModel, step: int) -> None:
        """At the end of guided burn-in, the student so far is exported and pushed to the `burn-in` branch when
        `hub.push_intermediate`."""
        hub = self.recipe.hub
        if hub.push and hub.push_intermediate:
            folder = self.export(student, "burn_in", step, None, f"{hub.repo_id}@burn-in")
            self.push(folder, "burn-in", f"Student at the end of guided burn-in (step {step})")

    def raise_failures(self) -> None:
        if self.failures:
            raise PushError("\n".join(self.failures))
