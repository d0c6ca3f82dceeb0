"""Recipes: each module defines `RECIPE`, a `finetune.recipes.base.Recipe` (its config, data reader,
task and report), which `finetune.recipes.base.train` runs. Presets are the YAML files in `configs/`,
named by their stem (`spam_tiny`); the first comment line of each says what it is for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from finetune.config import RunConfig, load_config
from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.recipes.base import Recipe

RECIPES = {"classification": "finetune.recipes.classification", "spam": "finetune.recipes.spam",
           "instruct": "finetune.recipes.instruct", "text": "finetune.recipes.text"}


def recipe(name: str) -> "Recipe":
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; available: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name]).RECIPE


def run_recipe(run_dir: Path) -> "Recipe":
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


def config_dir() -> Path:
    return Path(str(resources.files(__name__).joinpath("configs")))


def presets() -> list[Preset]:
    """The shipped preset configs, by name."""
    found = []
    for path in sorted(config_dir().glob("*.yaml")):
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
