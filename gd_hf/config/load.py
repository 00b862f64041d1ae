"""Loading a recipe: YAML plus dotted `key=value` overrides, typed (`gd_hf.config.types`) and checked
(`gd_hf.config.checks`); and the recipes derived from one (phase 1's, the resolved dict)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from gd_hf.config.checks import validate
from gd_hf.config.schema import Recipe
from gd_hf.config.types import RecipeError, build_dataclass, field_types, unknown_key


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    without a word: a recipe that sets `lr` twice trains with one the reader may not see)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden, as YAML says
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # `? [a, b]`: a key that is no plain value
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is not a plain value", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one section", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts."""
    keys = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the nested dict `data`; the value is parsed as YAML (`1e-4`, `true`, `[1, 2]`, `null`)."""
    if "=" not in override:
        raise RecipeError(f"override `{override}` is not of the form key=value (e.g. train.max_steps=200)")
    key, raw = override.split("=", 1)
    key = key.strip()
    valid = all_keys()
    if key not in valid:
        raise unknown_key(key, valid)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:  # `train.lr=[1`, `!!python/name:...`: the override, not a traceback
        why = " ".join(str(e).split())
        raise RecipeError(f"override `{override}`: its value is not valid YAML ({why}); quote strings") from e
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):  # the recipe's section is a list or a value: not silently replaced
            section = ".".join(parts[: depth + 1])
            raise RecipeError(
                f"{section}: expected a mapping of keys, got a {type(node[part]).__name__} (override `{override}`)"
            )
        node = node[part]
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, and return a validated `Recipe`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist (recipes live in recipes/*.yaml)")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    if data is None:  # empty, or comments only: training the defaults would not be what anyone meant
        raise RecipeError(
            f"{path} holds no recipe keys (it is empty or all comments): see recipes/*.yaml (`{{}}` is a recipe of "
            "gd_hf's defaults, if that is what is meant)"
        )
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path} holds a YAML {type(data).__name__}, not a mapping of recipe keys (output_dir:, model:, data:, ...)"
        )
    for override in overrides:
        apply_override(data, override)
    try:
        recipe = build_dataclass(Recipe, data, "")
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e
    validate(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (written next to every run)."""
    return dataclasses.asdict(recipe)


def names_a_checkpoint(recipe: Recipe) -> bool:
    """Whether `recipe.resume` is a checkpoint folder rather than one of the modes `auto`, `none`, `force`."""
    return recipe.resume not in ("auto", "none", "force")


def teacher_recipe_of(recipe: Recipe) -> Recipe:
    """The recipe of phase 1 of a one-launch run: supervised, into output_dir/teacher, for
    `ssl.teacher_max_steps`, pushed to the `teacher` branch with `hub.push_intermediate`."""
    teacher_recipe = dataclasses.replace(
        recipe,
        output_dir=str(Path(recipe.output_dir) / "teacher"),
        ssl=dataclasses.replace(recipe.ssl, enabled=False),
        # (the Space serves the distilled student only)
        hub=dataclasses.replace(
            recipe.hub, push=recipe.hub.push and recipe.hub.push_intermediate, revision="teacher", space_repo=None
        ),
        train=dataclasses.replace(recipe.train, max_steps=recipe.ssl.teacher_max_steps or recipe.train.max_steps),
        # `resume: PATH` names a checkpoint of the student; the teacher resumes from its own folder.
        resume="auto" if names_a_checkpoint(recipe) else recipe.resume,
    )
    if names_a_checkpoint(recipe):  # a checkpoint of phases 2-3 of another folder: its run's teacher
        teacher_recipe = dataclasses.replace(
            teacher_recipe, output_dir=str(Path(recipe.resume).parent.parent / "teacher")
        )
    return teacher_recipe
