"""The toolkit's shape, read from its source: the core (`finetune/`) never imports the recipes, and no
two modules import each other, directly or through others, whether at the top of a file or inside a
function (a lazy import that hides a cycle is a cycle)."""

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"finetune": "finetune", "evals": "finetune.evals", "recipes": "finetune.recipes"}  # folder -> package


def modules(root: Path) -> dict[str, Path]:
    """Every module of the toolkit by its installed name (recipes/ is finetune.recipes)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The toolkit modules a file imports anywhere in it, functions included (`from finetune import cli`
    names finetune.cli); imports for type checkers only (`if TYPE_CHECKING:`) never run and are skipped."""
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


def core_importing_recipes(root: Path) -> list[str]:
    edges = graph(root)
    return sorted(f"{m} -> {t}" for m, targets in edges.items() if not m.startswith("finetune.recipes")
                  for t in targets if t.startswith("finetune.recipes"))


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


def test_the_core_never_imports_the_recipes():
    assert core_importing_recipes(ROOT) == []


def test_no_import_cycles_not_even_lazy_ones():
    assert cycles(ROOT) == []
    edges = graph(ROOT)
    assert "finetune.model_commands" in edges["finetune.cli"]  # the scan sees the CLI's command modules
    assert [m for m, targets in edges.items() if "finetune.cli" in targets] == ["finetune.__main__"]  # nothing else


def test_the_scan_catches_a_planted_recipe_import_and_a_lazy_cycle(tmp_path):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    server = tmp_path / "finetune" / "server.py"
    server.write_text(server.read_text() + "\n\ndef _planted():\n    from finetune.recipes.instruct import RECIPE\n")
    assert core_importing_recipes(tmp_path) == ["finetune.server -> finetune.recipes.instruct"]
    commands = tmp_path / "finetune" / "model_commands.py"
    commands.write_text(commands.read_text() + "\n\ndef _planted():\n    from finetune.cli import main\n")
    assert ["finetune.cli", "finetune.model_commands"] in cycles(tmp_path)
