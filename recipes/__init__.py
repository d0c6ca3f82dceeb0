"""Recipes: each module defines `Config` (its typed config), `run(config, quiet)`, `evaluate_run(run_dir,
splits)` and `summary_table(metrics)`. Presets live in `recipes/configs/<name>.yaml`."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import yaml

from finetune.config import RunConfig, load_config
from finetune.errors import UserError

RECIPES = {"spam": "recipes.spam", "instruct": "recipes.instruct"}
CONFIG_DIR = Path(__file__).parent / "configs"


def recipe_module(name: str) -> ModuleType:
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; available: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])


def presets() -> dict[str, list[Path]]:
    """Preset YAML files per recipe, by their `recipe:` key."""
    found: dict[str, list[Path]] = {name: [] for name in RECIPES}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        recipe = (yaml.safe_load(path.read_text()) or {}).get("recipe")
        found.setdefault(recipe, []).append(path)
    return found


def load_run_config(recipe: str | None, path: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config for `recipe` from a YAML file (default: the recipe's preset) with overrides on top."""
    if recipe is not None:
        recipe_module(recipe)  # an unknown name is reported as such
    if path is None:
        if recipe is None:
            raise UserError("name a recipe or a config file")
        path = CONFIG_DIR / f"{recipe}.yaml"
    path = Path(path)
    try:
        declared = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("recipe")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        declared = None  # load_config reports the problem with the file precisely
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    name = recipe or declared
    if name is None:
        raise UserError(f"{path}: no 'recipe:' key; add e.g. 'recipe: spam'")
    if recipe and declared and declared != recipe:
        raise UserError(f"{path}: recipe '{declared}' does not match the requested recipe '{recipe}'")
    return load_config(recipe_module(name).Config, path, overrides)
