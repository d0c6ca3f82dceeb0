"""The toolkit's shape, read from its source: the folders are the layers, and a module imports only from
layers below its own (or its own folder); the core never imports, nor names, the recipes; no two modules
import each other, directly or through others, whether at the top of a file or inside a function (a lazy
import that hides a cycle is a cycle)."""

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"finetune": "finetune", "evals": "finetune.evals", "recipes": "finetune.recipes",
            "bundled": "finetune.datasets"}  # folder -> installed package

# Lowest first. A module may import from a lower rank, or from its own folder; the same rank is no excuse
# (training and inference know nothing of each other; serve, experiments and evals neither).
RANKS = {"base": 0, "model": 1, "data": 2, "checkpoints": 3, "formats": 4, "training": 5, "inference": 5,
         "serve": 6, "experiments": 6, "evals": 6, "cli": 7, "recipe_api": 7, "recipes": 8}
RECIPES_MAY_IMPORT = ("finetune.recipe_api", "finetune.recipes", "finetune.datasets")  # and nothing else of ours
SUBPACKAGES = ("model", "data", "checkpoints", "formats", "training", "inference", "serve", "experiments", "cli")


def modules(root: Path) -> dict[str, Path]:
    """Every module of the toolkit by its installed name (recipes/ is finetune.recipes), folders included."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> str:
    """The layer a module belongs to: its folder under finetune/, else evals, recipes or base."""
    parts = module.split(".")
    if module == "finetune.__main__":
        return "cli"
    if module == "finetune.recipe_api":
        return "recipe_api"
    if len(parts) > 1 and parts[1] in ("evals", "recipes"):
        return parts[1]
    if len(parts) > 2 and parts[1] in SUBPACKAGES or module in (f"finetune.{p}" for p in SUBPACKAGES):
        return parts[1]
    return "base"  # finetune, errors, progress, config, datasets


def imports(path: Path, known: set[str]) -> set[str]:
    """The toolkit modules a file imports anywhere in it, functions included (`from finetune.cli import
    main` names finetune.cli.main); imports for type checkers only (`if TYPE_CHECKING:`) never run and are
    skipped."""
    found, pending = set(), [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        pending.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in known}


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def upward_imports(root: Path) -> list[str]:
    """Imports from the same rank or above, other than within a folder."""
    return sorted(f"{m} -> {t}" for m, targets in graph(root).items() for t in targets
                  if layer(m) != layer(t) and RANKS[layer(t)] >= RANKS[layer(m)])


def recipes_beside_the_api(root: Path) -> list[str]:
    """What a bundled recipe imports from the toolkit other than the public recipe API (and other recipes,
    and the bundled data)."""
    return sorted(f"{m} -> {t}" for m, targets in graph(root).items() if layer(m) == "recipes"
                  for t in targets if not t.startswith(RECIPES_MAY_IMPORT))


def core_naming_recipes(root: Path) -> list[str]:
    """Core modules that import a recipe or name one of its modules (`finetune.recipes.x`) in their text.
    The entry-point group `finetune.recipes` is a name the core owns, not the package."""
    found = [f"{m} -> {t}" for m, targets in graph(root).items() if layer(m) != "recipes"
             for t in targets if layer(t) == "recipes"]
    for name, path in modules(root).items():
        if layer(name) not in ("recipes", "evals") and re.search(r"finetune\.recipes\.\w", path.read_text(encoding="utf-8")):
            found.append(f"{name} names finetune.recipes.*")
    return sorted(found)


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    edges, index, low, stack, on_stack, groups = graph(root), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_every_import_points_down_the_layers():
    assert upward_imports(ROOT) == []
    assert {layer(m) for m in modules(ROOT)} == set(RANKS) | {"base"}  # every layer has modules


def test_recipes_import_the_toolkit_only_through_its_recipe_api():
    assert recipes_beside_the_api(ROOT) == []
    import finetune.recipe_api as api

    assert sorted(api.__all__) == sorted(set(api.__all__)) and all(hasattr(api, name) for name in api.__all__)
    assert not [name for name in api.__all__ if name.startswith("_")]


def test_the_core_never_imports_or_names_the_recipes():
    assert core_naming_recipes(ROOT) == []


def test_no_import_cycles_not_even_lazy_ones():
    assert cycles(ROOT) == []
    edges = graph(ROOT)
    assert "finetune.cli.model_commands" in edges["finetune.cli.main"]  # the scan sees the CLI's command modules
    assert sorted(m for m, targets in edges.items() if "finetune.cli.main" in targets) == ["finetune.__main__", "finetune.cli"]


def test_the_top_level_is_small_and_no_module_is_long():
    top = sorted(p.name for p in (ROOT / "finetune").glob("*.py"))
    assert len(top) <= 8, top
    long = {str(p.relative_to(ROOT)): n for p in modules(ROOT).values() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_the_scan_catches_planted_imports_and_a_lazy_cycle(tmp_path):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "configs", "*-*"))

    def plant(relative: str, line: str) -> None:
        path = tmp_path / relative
        path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")

    plant("finetune/serve/app.py", "from finetune.recipes.instruct import RECIPE")
    assert "finetune.serve.app -> finetune.recipes.instruct" in core_naming_recipes(tmp_path)
    plant("finetune/experiments/sweep.py", "return 'finetune.recipes.spam'")
    assert "finetune.experiments.sweep names finetune.recipes.*" in core_naming_recipes(tmp_path)
    plant("finetune/model/lora.py", "from finetune.training.trainer import Trainer")
    plant("finetune/inference/respond.py", "from finetune.training.recipe import Recipe")
    assert {"finetune.model.lora -> finetune.training.trainer", "finetune.inference.respond -> finetune.training.recipe"} <= set(
        upward_imports(tmp_path))
    plant("recipes/text.py", "from finetune.training.trainer import Trainer")
    assert recipes_beside_the_api(tmp_path) == ["finetune.recipes.text -> finetune.training.trainer"]
    plant("finetune/cli/model_commands.py", "from finetune.cli import main")
    assert ["finetune.cli.main", "finetune.cli.model_commands"] in cycles(tmp_path)


def test_help_and_recipes_answer_without_importing_torch():
    """`finetune --help` and `finetune recipes` (names and presets) read no recipe module and load no torch."""
    import subprocess
    import sys

    for argv in (["--help"], ["recipes"]):
        code = (f"import sys; from finetune.cli import main; code = main({argv!r}); "
                "assert code == 0, code; assert 'torch' not in sys.modules, 'torch was imported'")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
    listed = subprocess.run([sys.executable, "-m", "finetune", "recipes"], capture_output=True, text=True, timeout=60)
    assert "spam_tiny" in listed.stdout and "instruct_tiny" in listed.stdout
