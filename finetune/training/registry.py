"""The recipes installed, found through the `finetune.recipes` entry-point group, and their presets.

A recipe is a training plugin: a package declares

    [project.entry-points."finetune.recipes"]
    my_recipe = "my_package.my_recipe:RECIPE"

and `finetune run my_recipe` trains it, with no change to the toolkit. A recipe's presets are the YAML
files in the `configs/` folder beside its module whose `recipe:` key names it, called by their stem
(`spam_tiny`); the first comment line of each says what it is for; its sweep specs are in `sweeps/`
there. Names, presets and sweeps are read without importing any recipe (so without torch): `finetune
recipes` answers at once.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from finetune.config import RunConfig, load_config
from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.training.recipe import Recipe

GROUP = "finetune.recipes"
PRESETS_FOLDER = "configs"  # beside a recipe's module
SWEEPS_FOLDER = "sweeps"


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def recipe_names() -> list[str]:
    return list(_entry_points())


def recipe(name: str) -> Recipe:
    # Imported here, not above: listing recipes and presets must not load torch (the recipe module does).
    from finetune.training.recipe import Recipe

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
class Shipped:
    """A YAML file a recipe's package ships: a preset (`configs/`) or a sweep (`sweeps/`)."""

    name: str  # the file's stem: what `--config NAME` or `--spec NAME` takes
    recipe: str  # its `recipe:` key
    purpose: str  # the file's first comment line
    path: Path
    package: str  # the distribution that ships it, as warnings name it


def _folder_beside(entry: EntryPoint, folder: str) -> Path | None:
    """`folder` beside the recipe's module, found without running the module (its parent packages run)."""
    try:
        spec = importlib.util.find_spec(entry.value.split(":")[0])
    except (ImportError, ValueError):
        return None  # reported when the recipe itself is loaded
    return Path(spec.origin).parent / folder if spec is not None and spec.origin else None


def _shipped(folder: str) -> list[Shipped]:
    """The YAML files in `folder` beside every installed recipe's module, read without importing a recipe."""
    folders: dict[Path, str] = {}
    for entry in _entry_points().values():
        found = _folder_beside(entry, folder)
        if found is not None and found.is_dir():
            folders.setdefault(found.resolve(), entry.dist.name if entry.dist else entry.value.split(".")[0])
    files = []
    for directory, package in folders.items():
        for path in sorted(directory.glob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            first = text.splitlines()[0] if text else ""
            purpose = first.lstrip("#").strip() if first.startswith("#") else ""
            try:
                owner = (yaml.safe_load(text) or {}).get("recipe", "")
            except (yaml.YAMLError, AttributeError):
                owner = ""  # load_config names the problem when the file is used
            files.append(Shipped(path.stem, str(owner), purpose, path, package))
    return sorted(files, key=lambda f: (f.name, f.package))


def presets() -> list[Shipped]:
    """Every installed recipe's presets: `configs/*.yaml` beside its module."""
    return _shipped(PRESETS_FOLDER)


def sweeps() -> list[Shipped]:
    """Every installed recipe's sweep specs (`finetune sweep --spec NAME`): `sweeps/*.yaml` beside its module."""
    return _shipped(SWEEPS_FOLDER)


def _by_name(files: list[Shipped], stem: str, recipe_name: str | None, kind: str) -> Shipped | None:
    """The file called `stem`, the one for `recipe_name` first; two packages shipping one name is a warning
    naming both."""
    named = [f for f in files if f.name == stem]
    if not named:
        return None
    chosen = next((f for f in named if f.recipe == recipe_name), named[0])
    if len(named) > 1:
        others = ", ".join(f"{f.package} ({f.path})" for f in named if f is not chosen)
        warnings.warn(
            f"{kind} '{stem}' is shipped by {chosen.package} ({chosen.path}) and by {others}; using "
            f"{chosen.package}'s, for recipe '{chosen.recipe}' (give a file path to choose)",
            stacklevel=3,
        )
    return chosen


def config_path(name_or_path: str | Path, recipe_name: str | None = None) -> Path:
    """A config file given by path, or a preset given by name (`spam_tiny`); a path wins when both exist.
    Presets are found per recipe: the one for `recipe_name` is taken."""
    return _file_or_shipped(
        name_or_path,
        presets(),
        recipe_name,
        "preset",
        f"{name_or_path}: no such config file or preset; presets: {{names}} (`finetune recipes` says what each is for)",
    )


def sweep_path(name_or_path: str | Path, recipe_name: str | None = None) -> Path:
    """A sweep spec given by path, or one a recipe's package ships, by name (`spam_ablation`)."""
    return _file_or_shipped(
        name_or_path,
        sweeps(),
        recipe_name,
        "sweep",
        f"--spec {name_or_path}: no such sweep file or shipped sweep; shipped: {{names}}",
    )


def _file_or_shipped(
    name_or_path: str | Path, shipped: list[Shipped], recipe_name: str | None, kind: str, missing: str
) -> Path:
    """`name_or_path` if it is a file, else the shipped file of that name; `missing` (with `{names}`, the
    shipped ones) is the error otherwise."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    chosen = _by_name(shipped, stem, recipe_name, kind) if path.parent == Path(".") else None
    if chosen is None:
        raise UserError(missing.replace("{names}", ", ".join(sorted({f.name for f in shipped})) or "none"))
    return chosen.path


def load_run_config(name: str | None, path: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config for recipe `name` from a YAML file or preset (default: the preset named after the
    recipe) with overrides on top."""
    if name is not None:
        recipe(name)  # an unknown name is reported as such
    if path is None:
        if name is None:
            raise UserError("name a recipe or a config file")
        path = name
    path = config_path(path, name)
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
