"""Which model family a recipe trains or an export holds (`model.family`): its `gd_hf.method.ModelFamily`, the
image processor its exports ship, and the state an export is saved in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformers import AutoModelForUniversalSegmentation, PreTrainedModel

from gd_hf.config import DataConfig, Recipe
from gd_hf.eomt import EomtFamily, MaskAnnealing, eomt_image_processor, without_masked_attention
from gd_hf.method import ModelFamily
from gd_hf.modeling import Mask2FormerFamily, build_image_processor


def build_family(recipe: Recipe) -> ModelFamily:
    """The model family of a phase of `recipe` (EoMT's annealing spans that phase's `train.max_steps`)."""
    model = recipe.model
    if model.family == "eomt":
        annealing = MaskAnnealing.from_recipe(model, recipe.train.max_steps, model.eomt_query_blocks)
        return EomtFamily(annealing, model.eomt_teacher_masks)
    return Mask2FormerFamily()


def family_of(model: PreTrainedModel) -> ModelFamily:
    """The family of a trained model (an export, a teacher), to predict with as at inference."""
    return EomtFamily() if model.config.model_type == "eomt" else Mask2FormerFamily()


def load_export(path: str) -> PreTrainedModel:
    """A trained model of either family from an export folder or hub id (plain transformers, as users load it)."""
    return AutoModelForUniversalSegmentation.from_pretrained(path)


def input_size_problem(model: PreTrainedModel, shortest_edge: int, longest_edge: int) -> str | None:
    """Why a test-time size cannot feed the model (EoMT takes exactly its `image_size` square), or None."""
    side = getattr(model.config, "image_size", None) if model.config.model_type == "eomt" else None
    if side is not None and max(shortest_edge, longest_edge) > side:
        return (f"this EoMT takes {side} x {side} inputs (its position embeddings do not interpolate): a test-time "
                f"size of {shortest_edge}/{longest_edge} exceeds it")  # fmt: skip
    return None


def export_image_processor(model: PreTrainedModel, data: DataConfig, divisor: int | None = None) -> Any:
    """The image processor an export ships: Mask2Former's with the run's evaluation resize and padding; EoMT's
    resizes the longer side to its `image_size` and pads square (the only input it takes)."""
    if model.config.model_type == "eomt":
        return eomt_image_processor(model.config.image_size)
    return build_image_processor(model, data, divisor)


@contextlib.contextmanager
def as_exported(model: PreTrainedModel) -> Iterator[None]:
    """The model in the state an export saves, for the duration (then as it was): an EoMT without masked attention
    (`attn_mask_probs` is saved in `model.safetensors`, and the training loop's value would ship otherwise: in eval
    mode a value strictly between 0 and 1 un-masks random queries)."""
    if model.config.model_type != "eomt":
        yield
        return
    with without_masked_attention(model):
        yield
