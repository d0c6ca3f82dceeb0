"""The recipes installed, found through the `finetune.recipes` entry-point group, and their presets.

A recipe is a training plugin: a package declares

    [project.entry-points."finetune.recipes"]
    my_recipe = "my_package.my_recipe:RECIPE"

and `finetune run my_recipe` trains it, with no change to the toolkit. Presets are the YAML files in
the directory a recipe names (`Recipe.presets`), called by their stem (`spam_tiny`); the first
comment line of each says what it is for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from finetune.config import RunConfig, load_config
from finetune.errors import UserError
from finetune.recipe import Recipe

GROUP = "finetune.recipes"


@lru_cache(maxsize=1)
def _entry_points() -> dict:
    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def recipe_names() -> list[str]:
    return list(_entry_points())


def recipe(name: str) -> Recipe:
    found = _entry_points()
    if name not in found:
        raise UserError(f"unknown recipe '{name}'; available: {', '.join(found) or 'none (is finetune installed?)'}")
    try:
        loaded = found[name].load()
    except Exception as e:  # a broken plugin is the user's to fix, named as such
        raise UserError(f"recipe '{name}' ({found[name].value}) failed to load: {type(e).__name__}: {e}") from e
    if not isinstance(loaded, Recipe):
        raise UserError(f"recipe '{name}': {found[name].value} is not a finetune Recipe")
    return loaded


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe that trained a run directory, from its config.yaml."""
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); pass the output_dir of a finished run")
    name = (yaml.safe_load(config_file.read_text()) or {}).get("recipe")
    if not name:
        raise UserError(f"{config_file}: no 'recipe:' key")
    return recipe(name)


@dataclass(frozen=True)
class Preset:
    name: str  # the file's stem: what `--config NAME` takes
    recipe: str
    purpose: str  # the file's first comment line
    path: Path


def presets() -> list[Preset]:
    """The preset configs of every installed recipe, by name."""
    directories = {recipe(name).presets for name in recipe_names()} - {None}
    found = []
    for path in sorted(p for d in directories for p in Path(d).glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        purpose = first.lstrip("#").strip() if first.startswith("#") else ""
        found.append(Preset(path.stem, (yaml.safe_load(text) or {}).get("recipe", ""), purpose, path))
    return found


def config_path(name_or_path: str | Path) -> Path:
    """A config file given by path, or a preset given by name (`spam_tiny`); a path wins when both exist."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    by_name = {p.name: p.path for p in presets()}
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in by_name:
        return by_name[stem]
    raise UserError(f"{name_or_path}: no such config file or preset; presets: {', '.join(by_name)} "
                    "(`finetune recipes` says what each is for)")


def load_run_config(name: str | None, path: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config for recipe `name` from a YAML file or preset (default: the preset named after the
    recipe) with overrides on top."""
    if name is not None:
        recipe(name)  # an unknown name is reported as such
    if path is None:
        if name is None:
            raise UserError("name a recipe or a config file")
        path = name
    path = config_path(path)
    try:
        declared = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("recipe")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        declared = None  # load_config reports the problem with the file precisely
    if name and declared and declared != name:
        raise UserError(f"{path}: recipe '{declared}' does not match the requested recipe '{name}'")
    name = name or declared
    if name is None:
        raise UserError(f"{path}: no 'recipe:' key; add e.g. 'recipe: classification'")
    return load_config(recipe(name).Config, path, overrides)
