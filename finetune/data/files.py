"""Reading files with errors that name the file, the line and the fix: text, JSON objects, JSON lines."""

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


def read_json_object(path: Path, hint: str = "") -> dict:
    """The JSON object in `path`; a missing, unreadable or malformed file, or another JSON value, is a
    UserError naming the file (`hint`, e.g. "; the checkpoint is corrupt", ends the message)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing{hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}){hint}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}{hint}")
    return value
