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
    """export.md's blocks run in tests/test_export.py and serving.md's in tests/test_serve.py; the others here."""
    found = {str(page.relative_to(ROOT)): re.findall(r"```python\n(.*?)```", page.read_text(), re.S) for page in PAGES}
    found = {page: blocks for page, blocks in found.items() if blocks}
    assert {page: len(blocks) for page, blocks in found.items()} == {"docs/export.md": 2, "docs/serving.md": 1, "docs/usage.md": 1}
    directory, _ = small_hf
    exec(found["docs/usage.md"][0].replace('"gpt2"', repr(str(directory))), {})
