"""Reading user files with errors that name the file, the line and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.errors import UserError


def read_text(path: Path, what: str, setting: str) -> str:
    """UTF-8 text of `path`; `what` and `setting` go into the error (e.g. "data file", "data.path")."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror}); check {setting}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; convert the file to UTF-8") from e


def jsonl_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON-lines text."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}:{e.colno}: malformed JSON ({e.msg})") from e
    return rows
