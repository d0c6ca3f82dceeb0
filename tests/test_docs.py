"""Docs that run: every shell block marked `<!-- test: run -->` in the README and docs/ runs as written,
line by line, in a fresh directory (a `finetune serve` line is started, asked for /health, and stopped);
every Python block in the docs runs in some test, and the README stays short."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKED = re.compile(r"<!-- test: run -->\n```bash\n(.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    return [(str(page.relative_to(ROOT)), block) for page in PAGES for block in MARKED.findall(page.read_text())]


def commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_marked_shell_blocks_run_as_written(tmp_path):
    """All pages' blocks in one directory, in page order, as a reader following them would; a command
    that an earlier page already ran (the README and Getting started share theirs) runs once."""
    assert shutil.which("finetune"), "the finetune command is not installed (pip install -e .)"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    servers, done_before = [], set()
    assert {page for page, _ in runnable_blocks()} >= {"README.md", "docs/getting-started.md"}
    try:
        for page, block in runnable_blocks():
            for command in commands(block):
                if command in done_before:
                    continue
                done_before.add(command)
                if command.startswith("finetune serve"):
                    servers.append(start_server(command, tmp_path, env))
                    continue
                done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=600)
                assert done.returncode == 0, f"{page}: `{command}` exited {done.returncode}: {done.stderr[-2000:]}"
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)


def start_server(command: str, cwd: Path, env: dict) -> subprocess.Popen:
    port = re.search(r"--port (\d+)", command)
    url = f"http://127.0.0.1:{port.group(1) if port else 8000}"
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            assert urllib.request.urlopen(url + "/health", timeout=1).status == 200
            return server
        except OSError:
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.1)
    raise AssertionError(f"`{command}` did not answer at {url}")


def test_the_readme_is_short_and_its_commands_are_tested():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    marked = MARKED.findall(readme)
    unmarked = [b for b in blocks if b not in marked]
    assert [commands(b) for b in unmarked] == [["pip install torch==2.13.0", "pip install finetune-gpt2        # or, from a checkout: pip install ."]]


def test_every_python_block_in_the_docs_runs_in_a_test(tmp_path, small_hf):
    """export.md's blocks run in tests/formats/test_export.py and serving.md's in tests/serve/test_serve.py;
    contributing.md's recipe in the test below; the others here."""
    found = {str(page.relative_to(ROOT)): re.findall(r"```python\n(.*?)```", page.read_text(), re.S) for page in PAGES}
    found = {page: blocks for page, blocks in found.items() if blocks}
    assert {page: len(blocks) for page, blocks in found.items()} == {"docs/contributing.md": 1, "docs/export.md": 2, "docs/serving.md": 1,
                                                               "docs/usage.md": 1}
    directory, _ = small_hf
    exec(found["docs/usage.md"][0].replace('"gpt2"', repr(str(directory))), {})


def test_the_layout_tree_in_contributing_lists_every_folder():
    page = (ROOT / "docs" / "contributing.md").read_text()
    tree = re.search(r"## How the code is laid out.*?```text\n(.*?)```", page, re.S).group(1)
    listed = set(re.findall(r"^  (\w+)/", tree, re.M))
    folders = {p.parent.name for p in (ROOT / "finetune").glob("*/__init__.py")}
    assert listed == folders
    assert set(re.findall(r"^(\w+)/", tree, re.M)) == {"finetune", "recipes", "evals", "bundled"}


def recipe_package(tmp_path: Path, source: str) -> Path:
    """contributing.md's recipe, its entry point and its preset as a package, installed into a folder."""
    page = (ROOT / "docs" / "contributing.md").read_text()
    toml = re.search(r"```toml\n(.*?)```", page, re.S).group(1)
    preset = re.search(r"```yaml\n(.*?)```", page, re.S).group(1)
    package = tmp_path / "src" / "lines_recipe"
    (package / "configs").mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    (package / "configs" / "lines_tiny.yaml").write_text(preset)
    (tmp_path / "src" / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "lines-recipe"\nversion = "0.1"\n' + toml +
        '[tool.setuptools]\npackages = ["lines_recipe"]\n[tool.setuptools.package-data]\nlines_recipe = ["configs/*"]\n')
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(site), str(tmp_path / "src")], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return site


def test_the_recipe_in_contributing_installs_and_trains_and_its_mistakes_fail_before_the_first_step(tmp_path):
    page = (ROOT / "docs" / "contributing.md").read_text()
    source = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i}: the river ran past house number {i}." for i in range(60)))

    def finetune(site: Path, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)

    site = recipe_package(tmp_path / "good", source)
    assert re.search(r"\nlines:\n  lines_tiny +Offline: gpt2-tiny", finetune(site, "recipes").stdout)
    ran = finetune(site, "run", "lines", "--config", "lines_tiny", "--quiet", "data.path=lines.txt", "output_dir=runs/lines")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "perplexity" in (tmp_path / "runs" / "lines" / "perplexity.txt").read_text()
    generated = finetune(site, "generate", "--model", "runs/lines", "--prompt", "line 3:", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr[-2000:]

    planted = source.replace("NextTokenTask(), meta)", 'NextTokenTask(), {**meta, "task": "tagging"})')
    assert planted != source
    site = recipe_package(tmp_path / "unknown_task", planted)
    for site, extra, said in ((site, [], "meta['task'] is 'tagging'"),
                              (recipe_package(tmp_path / "again", source), ["train.best_metric=accuracy"],
                               "train.best_metric='accuracy' is not a metric the lines recipe reports")):
        out = tmp_path / "runs" / f"mistake{len(extra)}"
        ran = finetune(site, "run", "lines", "--config", "lines_tiny", "data.path=lines.txt", f"output_dir={out}", *extra)
        errors = [line for line in ran.stderr.splitlines() if line.startswith("finetune: error")]
        assert ran.returncode == 2 and len(errors) == 1 and said in errors[0], ran.stderr[-2000:]
        assert not (out / "checkpoints").exists()  # not one step was taken
