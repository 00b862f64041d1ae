"""One phase of a launch (phase 1, the supervised teacher; or phases 2-3, guided burn-in then EMA distillation):
`Phase` holds everything it trains with, `build_phase` makes its models, method, optimizer and schedule, and
`build_student` the model it trains. `gd_hf.run.set_up.set_up_phase` adds the state, the batches and the
publisher; the loop (`gd_hf.run.loop`) and the periodic work (`gd_hf.run.periodic`) read and write it; the launch
(`gd_hf.run.launch.TrainingRecipe`) drops it whole at its end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from gd_hf.config import Recipe, RecipeError
from gd_hf.data.batches import TrainBatches
from gd_hf.data.prepare import RunData
from gd_hf.evaluation.mask_ap import Evaluation
from gd_hf.method import GuidedDistillation, PseudoLabelRule
from gd_hf.method.teacher import build_teacher, student_model_config
from gd_hf.models import ModelFamily, build_model, family_for
from gd_hf.models.common import ModelLoadError
from gd_hf.run.checkpointing import RunState
from gd_hf.run.eval_pictures import KeptPseudoLabels
from gd_hf.run.launches import check_output_folder, run_storage_bytes
from gd_hf.run.metrics_log import LogWindow
from gd_hf.run.optim import build_lr_scheduler, build_optimizer
from gd_hf.run.publisher import Publisher
from gd_hf.run.step import UpdateUndo


@dataclass
class Phase:
    """What one phase trains with: `set_up_phase` returns it, the loop and the periodic work read it, and the
    launch drops it whole at the phase's end (`TrainingRecipe.end_phase`)."""

    accelerator: Accelerator  # the launch's (one for every phase)
    recipe: Recipe  # the phase's (with `ssl.pseudo_label_score_threshold: auto` resolved: what the card says)
    recorded_recipe: Recipe  # what its checkpoints record and a relaunch is compared with
    data: RunData
    output_dir: Path
    family: ModelFamily
    padding_divisor: int
    image_processor: Any  # what its exports ship
    model: torch.nn.Module  # as the Accelerator prepared it (DDP-wrapped on several processes)
    student: torch.nn.Module  # unwrapped
    evaluated: torch.nn.Module  # what is scored and exported: the student, or the teacher (`ssl.evaluate`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    undo: UpdateUndo | None
    method: GuidedDistillation
    state: RunState = field(default_factory=RunState)
    batches: TrainBatches | None = None
    publisher: Publisher | None = None
    picture_examples: list[Any] = field(default_factory=list)  # rank 0: the val images of the pictures
    log: LogWindow | None = None  # the metrics of the steps since the last log line
    skipped_since_checkpoint: int = 0  # bad records skipped on this process since the last checkpoint
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    kept_pseudo_labels: KeptPseudoLabels | None = None  # for the next evaluation's picture (`keep_for_picture`)
    last_evaluation: Evaluation | None = None  # rank 0: the evaluation just done, until its pictures are drawn
    extension_points: dict[str, str] = field(default_factory=dict)  # custom ones, as checkpoints record them
    supervised_label: str = "supervised"  # what the bar calls a supervised phase: "teacher" in a GD launch

    def label(self, step: int) -> str:
        """What the bar calls the phase of `step`: `teacher` (phase 1 of a Guided Distillation run),
        `supervised` (a plain run), `burn-in`, `EMA`."""
        phase = self.method.phase(step)
        if phase == "supervised":
            return self.supervised_label
        return {"burn_in": "burn-in", "ema": "EMA"}[phase]

    def checkpointed_states(self) -> list[Any]:
        """What a checkpoint keeps beside the model, optimizer and RNG: the schedule, and the EMA teacher (part of
        the run's state in phases 2-3), in this order."""
        return [self.scheduler] + ([self.method.teacher] if self.method.teacher is not None else [])


def build_phase(
    accelerator: Accelerator, recipe: Recipe, data: RunData, recorded_recipe: Recipe,
    custom_family: ModelFamily | None = None, rule: PseudoLabelRule | None = None,
) -> Phase:  # fmt: skip
    """A phase of `recipe`: its family (`custom_family`, or the recipe's), student, method (with its teacher and
    `rule`), optimizer and schedule, on this process's device, once the output folder is known to have room for
    the run; `recorded_recipe`: what its checkpoints record. The rest (its state, batches, publisher) `set_up`
    adds."""
    cfg = recipe.train
    family = family_for(recipe, custom_family)
    model = build_student(recipe, data.categories.id2label, family)
    padding_divisor = family.padding_divisor(model)
    image_processor = family.image_processor(model, recipe.data, padding_divisor)
    optimizer = build_optimizer(model, cfg, family)
    scheduler = build_lr_scheduler(optimizer, cfg)
    teacher = build_teacher(recipe, model, data.categories.id2label, family)
    # The exports keep the data set's category id of each class: predictions name COCO's ids, not 0..C-1.
    for built in (model, teacher.model if teacher is not None else None):
        if built is not None and hasattr(built, "config"):
            built.config.dataset_category_ids = [int(i) for i in data.categories.ids]
    needed = run_storage_bytes(sum(p.numel() for p in model.parameters()), cfg.keep_checkpoints,
                               teacher is not None)  # fmt: skip
    problem = check_output_folder(Path(recipe.output_dir), needed)
    if problem:
        raise RecipeError(problem)
    # The schedule is stepped once per optimizer step by us (not once per process by accelerate): not prepared.
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device)
    student = accelerator.unwrap_model(prepared)
    method = GuidedDistillation(recipe.ssl, family, teacher, rule)
    # What is scored and exported: the student, or the teacher if asked.
    evaluated = teacher.model if teacher is not None and recipe.ssl.evaluate == "teacher" else student
    undo = UpdateUndo(optimizer) if cfg.undo_nonfinite_updates else None
    return Phase(accelerator, recipe, recorded_recipe, data, Path(recipe.output_dir), family, padding_divisor,
                 image_processor, prepared, student, evaluated, optimizer, scheduler, undo, method)  # fmt: skip


def build_student(recipe: Recipe, id2label: dict[int, str], family: ModelFamily | None = None) -> torch.nn.Module:
    """The model a phase trains, seeded by `recipe.seed`: built from the recipe's `model` settings, or with
    `ssl.student_init: teacher` from the teacher's export (`student_model_config`). The latter must be the
    architecture the recipe describes (what recipe.yaml, a relaunch and the card say was trained): the recipe's
    model is built too and their shapes compared, then the seed is drawn again, so the student from the teacher
    is the one `model.pretrained=<the teacher's export>` builds (benchmarks/student_init_equivalence.py)."""
    set_seed(recipe.seed)
    model = build_model(recipe.model, id2label, family)
    start = student_model_config(recipe)
    if start is recipe.model:
        return model
    described = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    del model
    set_seed(recipe.seed)
    try:
        model = build_model(start, id2label, family)
    except ModelLoadError as e:  # the recipe never named model.pretrained: say where that path came from
        raise ModelLoadError(f"ssl.student_init=teacher builds the student from ssl.teacher: {e}") from e
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differ = sorted(n for n in described.keys() | shapes.keys() if described.get(n) != shapes.get(n))
    if differ:
        raise RecipeError(
            f"ssl.student_init=teacher: ssl.teacher={recipe.ssl.teacher!r} is not the architecture of the recipe's "
            f"model.* settings ({len(differ)} tensors differ, e.g. "
            + ", ".join(
                f"{n}: {shapes.get(n, 'absent')} in the teacher, {described.get(n, 'absent')} in the recipe"
                for n in differ[:3]
            )
            + "): set model.* to the teacher's sizes, or ssl.student_init=pretrained"
        )
    return model
