"""What the model families share: loading errors that name the checkpoint, the class labels a model is built
for, re-heading a whole checkpoint for new classes, the matched loss computed outside `forward`, and the
mask-count fix for several processes."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from gd_hf.config.types import RecipeError
from gd_hf.models.protocol import Predictions

# The recipe's loss settings (`model.*`), written onto a re-headed checkpoint's config.
LOSS_SETTINGS = ("train_num_points", "no_object_weight", "class_weight", "mask_weight", "dice_weight")


class ModelLoadError(RecipeError):
    """`model.pretrained` cannot be used for the recipe's model (a recipe error: exit code 2)."""


@contextlib.contextmanager
def loading_named(source: str) -> Iterator[None]:
    """Whatever stops the weights of `source` from loading (a missing or truncated file, shapes that do not fit)
    as one `ModelLoadError` naming it, instead of a library traceback."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        raise ModelLoadError(
            f"model.pretrained={source!r} could not be loaded: {type(e).__name__}: {str(e)[:500]}\n"
            "Give a hub id (with network access or a filled HF cache) or a complete folder written by save_pretrained."
        ) from e
    except Exception as e:  # safetensors' SafetensorError (a truncated file) derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"model.pretrained={source!r}: its weights file is damaged ({e})") from e


def pretrained_config(source: str) -> PretrainedConfig:
    """The config.json of `model.pretrained` (what it is decides how it loads)."""
    with loading_named(source):
        return AutoConfig.from_pretrained(source)


def labels(id2label: dict[int, str]) -> dict[str, dict]:
    """`id2label` and `label2id` as a transformers config takes them."""
    return {"id2label": {int(k): v for k, v in id2label.items()}, "label2id": {v: int(k) for k, v in id2label.items()}}


def rehead(model: PreTrainedModel, cfg) -> None:
    """A whole checkpoint loaded for new classes (`ignore_mismatched_sizes`) made the recipe's: a new classifier,
    even when the class count happens to match the checkpoint's, and the recipe's loss settings, not the
    checkpoint's (`cfg`: the recipe's `model` settings)."""
    model.class_predictor.reset_parameters()
    for key in LOSS_SETTINGS:
        setattr(model.config, key, getattr(cfg, key))
    model.weight_dict = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight,
                         "loss_dice": cfg.dice_weight}  # fmt: skip
    model.criterion = type(model.criterion)(config=model.config, weight_dict=model.weight_dict)


def use_mean_mask_count_across_processes(model: PreTrainedModel) -> None:
    """Normalise the mask losses by the mean target count over processes, as detectron2 does.

    transformers' `get_num_masks` averages over processes and then divides by the world size again, so with N
    processes the mask and dice terms are N times too large (hf-notes). This replaces the method on this
    instance only; nothing of it is saved, so exported checkpoints stay vanilla.
    """

    def get_num_masks(self, class_labels, device):
        num_masks = torch.as_tensor(float(sum(len(c) for c in class_labels)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        return torch.clamp(num_masks, min=1)

    model.criterion.get_num_masks = types.MethodType(get_num_masks, model.criterion)


def is_model_folder(path: str | Path) -> bool:
    """True for a folder that holds a save_pretrained model."""
    return (Path(path) / "config.json").is_file()


def loss_terms(
    model: PreTrainedModel,
    predictions: Predictions,
    mask_labels: list[torch.Tensor],
    class_labels: list[torch.Tensor],
    no_object_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted matched loss terms (Hungarian matching, auxiliary layers included) of `predictions`, by the
    model's own criterion (Mask2Former's; EoMT's weighs and matches the same way).

    `model` is the unwrapped model. Computing the loss outside `forward` lets the loop log each term and reuse the
    criterion for pseudo labels. `no_object_weight`: the class-loss weight of "no object" for this call instead of
    the model's `config.no_object_weight`.
    """
    if no_object_weight is None:
        return _loss_dict(model, predictions, mask_labels, class_labels)
    criterion = model.criterion
    weights = criterion.empty_weight
    # A new tensor, not an in-place edit: the class loss keeps its weights for the backward pass.
    criterion.empty_weight = torch.cat([weights[:-1], weights.new_tensor([no_object_weight])])
    try:
        return _loss_dict(model, predictions, mask_labels, class_labels)
    finally:
        criterion.empty_weight = weights


def _loss_dict(model, predictions: Predictions, mask_labels, class_labels) -> dict[str, torch.Tensor]:
    return model.get_loss_dict(
        masks_queries_logits=predictions.mask_logits,
        class_queries_logits=predictions.class_logits,
        mask_labels=mask_labels,
        class_labels=class_labels,
        auxiliary_predictions=[
            {"masks_queries_logits": masks, "class_queries_logits": classes} for classes, masks in predictions.auxiliary
        ],
    )
