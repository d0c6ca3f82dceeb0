"""Checkpoint directories that are complete or absent: every file written under a temporary name,
fsync'd, listed with its SHA-256 in a manifest, then renamed into place; and verified on the way back.

What goes into a directory is the business of `finetune.checkpoints.model_files` (a model) and
`finetune.checkpoints.training_state` (optimizer and RNG); where a run keeps them, of
`finetune.checkpoints.run_directory`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from finetune.errors import UserError

MANIFEST = "manifest.json"


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (truncated, damaged, or half-written)."""


def write_directory(directory: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Create `directory` holding `files` (name -> writer of that path) atomically, replacing any old one.

    Everything is written under a temporary name with a manifest of SHA-256 sums, fsync'd, then
    renamed into place: a reader sees the old directory or the complete new one, never a mix.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {}
    for name, write in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # names may hold a folder: base/config.json
        write(tmp / name)
        _fsync(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    _fsync(directory.parent)


def recover(directory: Path) -> None:
    """Finish a replacement that was cut between its two renames: bring the old copy back."""
    directory = Path(directory)
    old = directory.with_name(f".old-{directory.name}")
    if old.is_dir() and not directory.exists():
        old.rename(directory)
    elif old.is_dir():
        shutil.rmtree(old)


def verify(directory: Path) -> None:
    """Check every file of a checkpoint against its manifest; raise CorruptCheckpoint naming the first bad one."""
    directory = Path(directory)
    recover(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{directory}: no {MANIFEST}; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{directory / MANIFEST}: unreadable ({e}); the checkpoint is corrupt") from e
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing; the checkpoint is incomplete")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(
                f"{path}: {path.stat().st_size} bytes, expected {expected['bytes']}; "
                "the file was truncated or changed after saving"
            )
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpoint(f"{path}: checksum mismatch; the file is corrupt or was changed after saving")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_file_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)`, synced, then renamed to `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    _fsync(tmp)
    tmp.replace(path)


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    write_file_atomic(path, write)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
