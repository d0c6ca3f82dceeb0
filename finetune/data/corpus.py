"""Plain text as token files: the data of the text recipe (continued pretraining, the book's chapter 5).

Text is read in blocks, tokenized in parallel batches and written as uint16 ids to `train.bin` and
`val.bin` (nanoGPT's approach), which training reads through `numpy.memmap`: memory stays flat
however large the corpus. The files are cached in a directory named by a hash of the sources'
contents, the tokenizer and the split, so a second run, or a resume, does not tokenize again, and a
changed source can never be read from a stale cache.

Documents (a text file, or a row of a table) are joined with `<|endoftext|>`. With one document the
split is by characters (the last `val_fraction` of the text, as the book splits *The Verdict*), with
several it is by documents (the last ones, in order).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.data.tables import EXTENSIONS, read_table
from finetune.errors import UserError
from finetune.model.tokenizer import ENCODER_JSON_SHA256, EOT, VOCAB_BPE_SHA256, get_tokenizer

FORMAT = "finetune-tokens/1"
TextFormat = Literal["txt", "csv", "tsv", "json", "jsonl", "parquet"]
BLOCK_CHARS = 1 << 20  # text tokenized per task: big enough to keep threads busy, small enough for flat memory
MANIFEST = "tokens.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # "txt", or a table format whose `text_field` column holds one document per row


@dataclass(frozen=True)
class Corpus:
    """Token files of a train and a validation split, and what they came from."""

    directory: Path
    manifest: dict

    def tokens(self, split: str) -> np.ndarray:
        path = self.directory / SPLIT_FILES[split]
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=np.uint16)  # numpy cannot map an empty file
        return np.memmap(path, dtype=np.uint16, mode="r")


# -- finding the files --------------------------------------------------------------------------


def find_sources(paths: list[str], fmt: str | None) -> list[Source]:
    """Files named by `data.path` entries: a file, a directory (its `.txt` files, recursively) or a glob."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            texts = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not texts:
                raise UserError(
                    f"{path}: directory holds no .txt files; name the files with a glob, e.g. data.path='docs/**/*.md'"
                )
            found += texts
        elif glob.has_magic(entry):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"data.path '{entry}' matches no file")
            found += matches
        else:
            raise UserError(f"{path}: no such file or directory; check data.path")
    return [Source(p, fmt or EXTENSIONS.get(p.suffix.lower(), "txt")) for p in dict.fromkeys(found)]


# -- reading text -------------------------------------------------------------------------------


def _safe_cut(text: str) -> int:
    """The last position where `text` can be cut without changing its tokens, or 0 if none.

    GPT-2's pre-tokenizer never joins a single space that sits between two printable non-space ASCII
    characters with what comes before it: the space starts the next piece (" word", " 42", " (").
    Cutting just before such a space gives the same tokens in two calls as in one."""
    at = len(text) - 1
    while (at := text.rfind(" ", 1, at)) > 0:
        if "!" <= text[at - 1] <= "~" and "!" <= text[at + 1] <= "~":
            return at
    return 0


def _text_blocks(path: Path) -> Iterator[str]:
    """A UTF-8 text file in blocks of about BLOCK_CHARS, each ending where a cut is safe."""
    carry = ""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text; newlines made \n
            while block := f.read(BLOCK_CHARS):
                if "\0" in block:
                    raise UserError(f"{path}: binary file (NUL bytes); remove it from data.path")
                text = carry + block
                cut = _safe_cut(text)
                if cut == 0:
                    carry = text  # no safe place yet (a very long word); read on
                    continue
                yield text[:cut]
                carry = text[cut:]
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8 or remove it from data.path"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if carry:
        yield carry


def _table_documents(source: Source, text_field: str) -> list[str]:
    table = read_table(source.path, source.format)
    texts = table.column(text_field, "data.text_field to the column that holds the text").tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: '{text_field}' is empty or not text; remove the row")
    return texts


def _documents(sources: list[Source], text_field: str) -> Iterator[Iterator[str]]:
    """Each document as its text in blocks (a whole text file, or one row of a table)."""
    for source in sources:
        if source.format == "txt":
            yield _checked(_text_blocks(source.path), source.path)
        else:
            for text in _table_documents(source, text_field):
                yield iter([text])


def _checked(blocks: Iterator[str], path: Path) -> Iterator[str]:
    empty = True
    for block in blocks:
        empty = empty and not block.strip()
        yield block
    if empty:
        raise UserError(f"{path}: empty file; add text or remove it from data.path")


def _count_documents(sources: list[Source], text_field: str) -> int:
    return sum(1 if s.format == "txt" else len(_table_documents(s, text_field)) for s in sources)


def _characters(blocks: Iterator[str]) -> int:
    return sum(len(b) for b in blocks)


# -- tokenizing ---------------------------------------------------------------------------------


class _TokenWriter:
    """Text in, uint16 token ids out to a file: blocks are tokenized a batch at a time on a thread per core."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.pending: list[str] = []
        self.pending_chars = 0
        self.count = 0
        self.threads = os.cpu_count() or 1

    def write(self, text: str) -> None:
        """Append `text`, which must end where a cut is safe (or at a document's end)."""
        self.pending.append(text)
        self.pending_chars += len(text)
        if self.pending_chars >= self.threads * BLOCK_CHARS:
            self.flush()

    def flush(self) -> None:
        blocks = _coalesce(self.pending)
        for ids in get_tokenizer().encode_batch(blocks, num_threads=self.threads, allowed_special={EOT}):
            np.asarray(ids, dtype=np.uint16).tofile(self.file)
            self.count += len(ids)
        self.pending, self.pending_chars = [], 0

    def finish(self) -> int:
        """Tokenize what is pending; the number of tokens written."""
        self.flush()
        return self.count


def _coalesce(pieces: list[str]) -> list[str]:
    """Short pieces (rows of a table) joined into blocks of about BLOCK_CHARS: one thread task each."""
    blocks, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece)
        if size >= BLOCK_CHARS:
            blocks.append("".join(current))
            current, size = [], 0
    if current:
        blocks.append("".join(current))
    return blocks


def _write_splits(sources: list[Source], text_field: str, val_fraction: float, directory: Path) -> dict:
    """Tokenize `sources` into train.bin and val.bin in `directory`; returns the manifest's counts."""
    n_docs = _count_documents(sources, text_field)
    writers = {split: _TokenWriter(directory / name) for split, name in SPLIT_FILES.items()}
    try:
        if n_docs == 1:  # split by characters, each part tokenized on its own (the book's train_data / val_data)
            split_by, documents = "characters", {"train": 1, "val": 1}
            total = _characters(next(_documents(sources, text_field)))
            cut, position = int(total * (1 - val_fraction)), 0
            for block in next(_documents(sources, text_field)):
                head = block[: max(0, cut - position)]
                if head:
                    writers["train"].write(head)
                if len(head) < len(block):
                    writers["val"].write(block[len(head) :])
                position += len(block)
        else:
            split_by, documents = "documents", {"train": 0, "val": 0}
            n_val = max(1, round(n_docs * val_fraction))
            for i, blocks in enumerate(_documents(sources, text_field)):
                split = "train" if i < n_docs - n_val else "val"
                if documents[split]:
                    writers[split].write(EOT)  # documents joined with <|endoftext|>
                for block in blocks:
                    writers[split].write(block)
                documents[split] += 1
        tokens = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.file.close()
    return {"split": split_by, "documents": documents, "tokens": tokens}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "tokens"


def tokenized(sources: list[Source], text_field: str, val_fraction: float, cache_dir: Path) -> Corpus:
    """The token files of `sources`, from the cache when their contents were tokenized the same way before."""
    key = {
        "format": FORMAT,
        "tokenizer": f"gpt2 {VOCAB_BPE_SHA256[:16]} {ENCODER_JSON_SHA256[:16]}",
        "sources": [
            {
                "sha256": _file_sha256(s.path),
                "format": s.format,
                **({"text_field": text_field} if s.format != "txt" else {}),
            }
            for s in sources
        ],
        "val_fraction": val_fraction,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    directory = cache_dir / name
    cached = _read_cached(directory, key)
    if cached is not None:
        return Corpus(directory, cached)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir))
    try:
        manifest = {
            **key,
            "paths": [str(s.path) for s in sources],
            **_write_splits(sources, text_field, val_fraction, tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(directory, ignore_errors=True)  # a damaged entry of the same key
        try:
            tmp.replace(directory)
        except OSError:  # another process finished the same entry first: its files are the same
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Corpus(directory, json.loads((directory / MANIFEST).read_text()))


def _read_cached(directory: Path, key: dict) -> dict | None:
    """The manifest of a complete cache entry for `key`; None (with a warning if damaged) otherwise."""
    if not directory.is_dir():
        return None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        sizes_match = all(
            (directory / name).stat().st_size == 2 * manifest["tokens"][split] for split, name in SPLIT_FILES.items()
        )
        if sizes_match and all(manifest.get(k) == v for k, v in key.items()):
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    warnings.warn(f"{directory}: cached token files do not match their sources; tokenizing again", stacklevel=3)
    return None


# -- training windows ---------------------------------------------------------------------------


class Windows(Dataset):
    """The book's `GPTDatasetV1` over a token file: window i starts at token i × stride; its input is
    `max_length` tokens and its target the same tokens shifted by one."""

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int) -> None:
        self.tokens, self.max_length, self.stride = tokens, max_length, stride
        self.starts = range(0, len(tokens) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.starts[i]
        return torch.from_numpy(self.tokens[start : start + self.max_length + 1].astype(np.int64))


def collate_windows(batch: list[torch.Tensor]) -> dict:
    rows = torch.stack(batch)
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "count": rows.shape[0] * (rows.shape[1] - 1)}
