"""The model families: one module each (`mask2former`, `eomt`), what they share (`common`), and the protocol a
family follows (`protocol.ModelFamily`). This module is the one list of the built-in families and the one place
that picks among them: by the recipe's `model.family` (`family_for`) or by an export's `model_type`
(`family_of`). A family of your own is passed in (`gd_hf.train.train(recipe, model_family=...)`), never registered.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForUniversalSegmentation, PreTrainedModel

from gd_hf.config import ModelConfig, Recipe, RecipeError
from gd_hf.models.common import ModelLoadError
from gd_hf.models.eomt import EomtFamily
from gd_hf.models.mask2former import Mask2FormerFamily
from gd_hf.models.protocol import ModelFamily, Predictions

__all__ = ["BUILT_IN_FAMILIES", "ModelFamily", "Predictions", "build_model", "built_in_family", "check_recipe", "display_name",
           "export_image_processor", "family_for", "family_of", "input_size_problem", "load_export"]  # fmt: skip

# name -> class with `from_recipe(recipe)` and a no-argument constructor (a family to predict with).
BUILT_IN_FAMILIES: dict[str, type] = {family.name: family for family in (Mask2FormerFamily, EomtFamily)}


def built_in_family(name: str, own: str = "gd_hf.train.train(recipe, model_family=...)") -> type:
    """The built-in family class `model.family` names; a `RecipeError` listing them otherwise (`own`: how a
    family of your own is passed where this is asked)."""
    if name not in BUILT_IN_FAMILIES:
        raise RecipeError(f"model.family: {name!r} is not one of {', '.join(repr(n) for n in BUILT_IN_FAMILIES)} "
                          f"(a family of your own is passed as {own})")  # fmt: skip
    return BUILT_IN_FAMILIES[name]


def family_for(recipe: Recipe, custom: ModelFamily | None = None) -> ModelFamily:
    """The family a phase of `recipe` trains: `custom` (passed from Python) or the built-in family the recipe's
    `model.family` names, set up for this phase (EoMT's annealing spans its `train.max_steps`); its recipe checks
    passed (`check_recipe`)."""
    check_recipe(recipe, custom)
    return custom if custom is not None else built_in_family(recipe.model.family).from_recipe(recipe)


def check_recipe(recipe: Recipe, custom: ModelFamily | None = None) -> None:
    """`model.family` names a family, and that family's checks of the recipe pass (`ModelFamily.recipe_problems`):
    a `RecipeError` naming the first that fails (the recipe's generic checks ran in `load_recipe`)."""
    name = recipe.model.family
    if custom is not None and getattr(custom, "name", None) != name:
        raise RecipeError(f"model.family: {name!r}, but the model_family passed is {type(custom).__name__} (its "
                          f"`name`: {getattr(custom, 'name', None)!r}): set model.family to its name")  # fmt: skip
    family = custom if custom is not None else built_in_family(name)()
    for ok, key, message in family.recipe_problems(recipe):
        if not ok:
            raise RecipeError(f"{key} {message}")


def build_model(cfg: ModelConfig, id2label: dict[int, str], family: ModelFamily | None = None) -> PreTrainedModel:
    """The model of a recipe's `model` settings for the classes `id2label` (contiguous ids 0..C-1), built by
    `family` (None: the built-in family `cfg.family` names)."""
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label must map 0..C-1 to class names, got {id2label}")
    family = family if family is not None else built_in_family(cfg.family, "build_model(cfg, id2label, family=...)")()
    if cfg.pretrained is not None:
        _refuse_another_family(cfg, family)
    return family.build_model(cfg, id2label)


def _refuse_another_family(cfg: ModelConfig, family: ModelFamily) -> None:
    """A whole checkpoint of another built-in family: say which `model.family` it needs (a missing or unreadable
    checkpoint is left to the family's loading, which names it)."""
    try:
        model_type = AutoConfig.from_pretrained(cfg.pretrained).model_type
    except (OSError, ValueError):
        return
    other = BUILT_IN_FAMILIES.get(model_type)
    if other is not None and model_type != family.name:
        article = "an" if other.display_name[0] in "AEIOU" else "a"
        raise ModelLoadError(f"model.pretrained={cfg.pretrained!r} is {article} {other.display_name} checkpoint: set "
                             f"model.family={model_type}")  # fmt: skip


def family_of(model: PreTrainedModel) -> ModelFamily:
    """The built-in family of a trained model (an export, a teacher), to predict with as at inference."""
    model_type = model.config.model_type
    if model_type not in BUILT_IN_FAMILIES:
        raise RecipeError(f"a {model_type!r} model is of no built-in family ({', '.join(BUILT_IN_FAMILIES)}): "
                          "predict with its own family (family=...)")  # fmt: skip
    return BUILT_IN_FAMILIES[model_type]()


class ExportMismatchError(ValueError):
    """An export whose weights are not the model its config.json describes."""


def load_export(path: str) -> PreTrainedModel:
    """A trained model from an export folder or hub id (plain transformers, as users load it). Weights that do not
    fit the config (another family's or size's: transformers would start the missing ones at random, with a
    warning, and the model would predict noise) are an `ExportMismatchError`."""
    model, info = AutoModelForUniversalSegmentation.from_pretrained(path, output_loading_info=True)
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        example = (list(missing) + list(unexpected) + [str(m) for m in mismatched])[:3]
        raise ExportMismatchError(
            f"{path}: its weights are not the {model.config.model_type} its config.json describes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape, e.g. "
            f"{', '.join(map(str, example))}): export it again"
        )
    return model


def display_name(model_type: str | None, default: str) -> str:
    """The prose name of the built-in family of `model_type` (config.json's), else `default`."""
    family = BUILT_IN_FAMILIES.get(model_type or "")
    return family.display_name if family is not None else default


def input_size_problem(model: PreTrainedModel, shortest_edge: int, longest_edge: int) -> str | None:
    """Why a trained model cannot predict at a test-time size (or at all: a model of no built-in family), or None."""
    family = BUILT_IN_FAMILIES.get(model.config.model_type)
    if family is None:
        return (f"a {model.config.model_type!r} model is of no model family gd_hf knows "
                f"({', '.join(BUILT_IN_FAMILIES)})")  # fmt: skip
    return family().input_size_problem(model, shortest_edge, longest_edge)


def export_image_processor(model: PreTrainedModel, data, padding_divisor: int | None = None):
    """The image processor a trained model's export ships, by its built-in family (`ModelFamily.image_processor`;
    `padding_divisor` None: the family's own for the model)."""
    family = family_of(model)
    divisor = padding_divisor if padding_divisor is not None else family.padding_divisor(model)
    return family.image_processor(model, data, divisor)
