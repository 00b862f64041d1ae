"""What gd_hf needs of a model family: `ModelFamily`, and the `Predictions` its forward pass returns.

A family is one class (`gd_hf.models.mask2former.Mask2FormerFamily`, `gd_hf.models.eomt.EomtFamily`, or yours,
passed as `gd_hf.train.train(recipe, model_family=...)`): what the method calls each step, and what a run calls around
it (build the model, its image processor, its learning-rate groups, the state an export saves, its recipe checks,
its model-card text). Nothing outside a family's module names a family (tests/test_layout.py checks the imports;
docs/models.md, "A model family of your own", has the example).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from gd_hf.config import DataConfig, ModelConfig, Recipe

Check = tuple[bool, str, str]
"""`(passes, key, message)`: a failing check is reported as `f"{key} {message}"` (as `gd_hf.config.checks`)."""


@dataclass
class Predictions:
    """A model's per-query outputs: class logits (B, Q, C+1; the last class is "no object"), mask logits
    (B, Q, h, w), and the same pair from each intermediate decoder layer (the loss's auxiliary terms)."""

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    auxiliary: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def rows(self, rows: slice) -> Predictions:
        """The predictions of a slice of the batch (the labeled images, or the strong views)."""
        return Predictions(
            self.class_logits[rows], self.mask_logits[rows], [(c[rows], m[rows]) for c, m in self.auxiliary]
        )


@dataclass(frozen=True)
class FamilyCard:
    """What a model card says of the family beside its `display_name`: the transformers class users load, one
    line on the architecture (sizes, what it started from)."""

    model_class: str
    architecture: str
    unread_model_keys: tuple[str, ...] = ()  # `model.*` keys the family never reads: the card leaves them out


class ModelFamily(Protocol):
    """A model family: what Guided Distillation calls each step, and what a run calls around it."""

    name: str
    """The `model.family` value it trains, and the `model_type` of the config.json its exports hold."""

    display_name: str
    """Its name in prose (model cards, the Space, messages): "Mask2Former"."""

    black_padding: bool
    """How its inputs are padded, as its exported image processor pads: black (EoMT's pads before normalising)
    or, False, the mean colour (Mask2Former's pads after)."""

    scheduled_buffers: tuple[str, ...]
    """Buffers `start_step` writes from the step: the EMA teacher never averages or copies them."""

    # -- what the method calls ------------------------------------------------------------------------------------

    def forward(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        """The training forward pass, auxiliary predictions included (`model` may be DDP-wrapped)."""

    def loss(
        self, model: torch.nn.Module, predictions: Predictions, mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor], *, no_object_weight: float | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The weighted matched loss terms (`gd_hf.method.LOGGED_LOSS_TERMS` among them) of `predictions` against
        the targets; `model` is the unwrapped model (its criterion). `no_object_weight`
        (`ssl.unsup_no_object_weight`, passed only when the recipe sets it): the class-loss weight of "no object"
        instead of the model's own."""

    def padding_divisor(self, model: torch.nn.Module) -> int:
        """Input sides must be multiples of this."""

    def predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        """The model's predictions as at inference (in eval mode, under `torch.no_grad`; evaluation, the teacher
        check and the fixed teacher): deterministic, as the export predicts."""

    def teacher_predict(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> Predictions:
        """How the teacher predicts during training, as `start_step` set it up (deterministic)."""

    def start_step(
        self, step: int, phase: str, student: torch.nn.Module, teacher: torch.nn.Module | None
    ) -> dict[str, float]:
        """Before optimizer step `step` of `phase` (`supervised`, `burn_in`, `ema`), also the first after a
        resume: whatever the family schedules by the step, as a pure function of it (EoMT: the student's
        masked-attention probabilities and the teacher's masking; Mask2Former: nothing). Returns what to log of
        it (`{}`: nothing)."""

    def load_pretrained(self, path: str) -> torch.nn.Module:
        """A trained model of this family from an export folder or hub id (`ssl.teacher`)."""

    # -- what a run calls around the method -----------------------------------------------------------------------

    def recipe_problems(self, recipe: Recipe) -> list[Check]:
        """Checks of the recipe's keys this family reads, run before any work (after the generic ones)."""

    def build_model(self, cfg: ModelConfig, id2label: dict[int, str]) -> PreTrainedModel:
        """The model of `cfg` for the classes `id2label` (contiguous ids 0..C-1): from `cfg`'s sizes, from a
        backbone checkpoint, or from a whole checkpoint of this family re-headed for these classes with `cfg`'s
        loss settings (`cfg.pretrained`). Raises `gd_hf.models.common.ModelLoadError` naming what does not fit."""

    def image_processor(self, model: PreTrainedModel, data: DataConfig, padding_divisor: int) -> Any:
        """The image processor an export ships: the evaluation's resize and padding."""

    def lr_scale(self, model: torch.nn.Module, name: str, layer_lr_decay: float) -> float | None:
        """None for a parameter outside the backbone; else its learning-rate factor beside
        `train.backbone_lr_multiplier` (`train.layer_lr_decay` as the family applies it)."""

    def exported(self, model: PreTrainedModel) -> AbstractContextManager[None]:
        """The model in the state an export saves, for the duration (then as it was)."""

    def input_size_problem(self, model: PreTrainedModel, shortest_edge: int, longest_edge: int) -> str | None:
        """Why a test-time size cannot feed the model, or None."""

    def card(self, cfg: ModelConfig, pretrained: str | None) -> FamilyCard:
        """What the model card says of the family (`pretrained`: `cfg.pretrained` as it may be published)."""

    def usage_snippet(self, load: str, imports: str, image_path: str) -> str:
        """Python (a fenced block) that loads the export (`load`: the `from_pretrained` arguments) and segments
        the image at `image_path` (an expression; `imports`: what that expression needs). It runs as written."""
