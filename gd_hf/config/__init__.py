"""Recipes: the dataclasses of every YAML key (`schema`), YAML values to typed fields (`types`), the value checks
types cannot express (`checks`), and loading with overrides (`load`). Everything is importable from here:
`from gd_hf.config import Recipe, load_recipe`."""

from gd_hf.config.checks import short_run_warnings
from gd_hf.config.load import (
    all_keys,
    apply_override,
    load_recipe,
    names_a_checkpoint,
    recipe_to_dict,
    teacher_recipe_of,
)
from gd_hf.config.schema import (
    DataConfig,
    EvalConfig,
    HubColumns,
    HubConfig,
    ModelConfig,
    Recipe,
    SslConfig,
    TrainConfig,
)
from gd_hf.config.types import RecipeError

__all__ = ["DataConfig", "EvalConfig", "HubColumns", "HubConfig", "ModelConfig", "Recipe", "RecipeError", "SslConfig",
           "TrainConfig", "all_keys", "apply_override", "load_recipe", "names_a_checkpoint", "recipe_to_dict",
           "short_run_warnings", "teacher_recipe_of"]  # fmt: skip
