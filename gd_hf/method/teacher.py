"""The teacher: frozen during guided burn-in, then an exponential moving average of the student."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from gd_hf.config import ModelConfig, Recipe, RecipeError
from gd_hf.weights import NonFiniteWeightsError, check_finite

if TYPE_CHECKING:
    from gd_hf.models.protocol import ModelFamily


class EmaTeacher(torch.nn.Module):
    """Wraps the teacher model: always eval mode, no gradients, updated only by `copy_from` / `update`.

    Its state dict is saved and restored with the run's checkpoints (`gd_hf.run.checkpointing`), so a resumed run
    has the same teacher. `scheduled_buffers`: the buffers the model family writes from the step
    (`ModelFamily.scheduled_buffers`), never averaged or copied.
    """

    def __init__(self, model: torch.nn.Module, scheduled_buffers: tuple[str, ...] = ()):
        super().__init__()
        self.scheduled_buffers = tuple(scheduled_buffers)
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> EmaTeacher:
        # The teacher never trains: dropout and drop-path stay off whatever the caller asks.
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def _pairs(self, student: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher_state = self.model.state_dict(keep_vars=True)
        student_state = student.state_dict(keep_vars=True)
        if teacher_state.keys() != student_state.keys():
            raise ValueError("teacher and student have different parameters: they must be the same architecture")
        # Parameters and floating-point buffers take part; integer buffers (counters) are left as they are, and so
        # are the buffers the model family sets from the step (an average of EoMT's masked-attention
        # probabilities would be a meaningless in-between value, and in eval mode one strictly between 0 and 1
        # un-masks random queries).
        skip = self.scheduled_buffers
        names = [n for n, t in teacher_state.items() if t.is_floating_point() and not n.endswith(skip)]
        return [teacher_state[n].data for n in names], [student_state[n].data for n in names]

    @torch.no_grad()
    def copy_from(self, student: torch.nn.Module) -> None:
        """teacher <- student (the EMA with decay 0 at the end of burn-in)."""
        teacher, source = self._pairs(student)
        torch._foreach_copy_(teacher, source)

    @torch.no_grad()
    def update(self, student: torch.nn.Module, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, in place, with foreach kernels."""
        teacher, source = self._pairs(student)
        torch._foreach_lerp_(teacher, source, 1.0 - decay)


def _export_model_type(path: str) -> str | None:
    """The `model_type` of an export's config.json (None when it cannot be read: loading then says why)."""
    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError):
        return None


def student_model_config(recipe: Recipe) -> ModelConfig:
    """The `model` settings the student is built from: the recipe's, or with `ssl.student_init: teacher` the same
    with the teacher's export as `model.pretrained` (`build_model` re-heads a whole checkpoint: fresh class head,
    the recipe's loss settings), so the student starts from what the labels taught its teacher."""
    ssl = recipe.ssl
    if ssl.enabled and ssl.student_init == "teacher" and ssl.teacher is not None:
        return dataclasses.replace(recipe.model, pretrained=ssl.teacher)
    return recipe.model


def build_teacher(
    recipe: Recipe, student: torch.nn.Module, id2label: dict[int, str], family: ModelFamily
) -> EmaTeacher | None:
    """The phase-1 teacher `ssl.teacher`, checked against the student and the data (or, without one, a
    placeholder the student overwrites at burn-in's end); None for a supervised run."""
    if not recipe.ssl.enabled:
        return None
    if recipe.ssl.teacher is None:
        return EmaTeacher(copy.deepcopy(student), family.scheduled_buffers)
    exported = _export_model_type(recipe.ssl.teacher)
    if exported is not None and exported != student.config.model_type:
        raise RecipeError(
            f"ssl.teacher={recipe.ssl.teacher!r} is a {exported!r} model, but the recipe trains a "
            f"{student.config.model_type!r} one (model.family): the EMA phase needs teacher and student of one "
            "architecture"
        )
    try:
        model = family.load_pretrained(recipe.ssl.teacher)
    except (OSError, ValueError) as e:
        raise RecipeError(f"ssl.teacher={recipe.ssl.teacher!r} could not be loaded: {e}") from e
    try:
        check_finite(model, f"ssl.teacher={recipe.ssl.teacher!r}")
    except NonFiniteWeightsError as e:  # found now, not at the first checkpoint hours in
        raise RecipeError(f"{e}: train the teacher again or choose another export") from e
    teacher_labels = {int(k): v for k, v in model.config.id2label.items()}
    if teacher_labels != id2label:
        raise RecipeError(
            f"ssl.teacher={recipe.ssl.teacher!r} predicts {teacher_labels}, but the data's classes are {id2label}: "
            "train the teacher on the same categories"
        )
    student_shapes = {k: v.shape for k, v in student.state_dict().items()}
    teacher_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if student_shapes != teacher_shapes:
        raise RecipeError(
            f"ssl.teacher={recipe.ssl.teacher!r} is not the recipe's architecture (model.*): the EMA phase needs "
            "teacher and student of the same shape"
        )
    return EmaTeacher(model, family.scheduled_buffers)
