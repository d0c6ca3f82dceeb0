"""The one reader for user data files: CSV, TSV, JSON, JSON Lines, Parquet, and the SMS Spam
Collection's raw `label<TAB>text` lines, each into a pandas DataFrame of the columns a recipe asks for.

Every problem is a UserError naming the file, the row (or line) and the fix. Rows are named as a
person would find them: `line N` for line-based formats (JSON Lines, raw), `row N` (the N-th record
after the header) for CSV, TSV, Parquet and JSON lists.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from finetune.data.files import jsonl_rows, read_text
from finetune.errors import UserError

Format = Literal["csv", "tsv", "json", "jsonl", "parquet", "raw"]
FORMATS: tuple[str, ...] = ("csv", "tsv", "json", "jsonl", "parquet", "raw")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
RAW_COLUMNS = ("label", "text")  # the columns of a raw label<TAB>text file


@dataclass
class Table:
    """A file's records, with where each came from."""

    path: Path
    frame: pd.DataFrame
    lines: list[int] | None = None  # file line of each record, for line-based formats
    unit: str = "row"  # what a record is called otherwise: a row (CSV, Parquet) or a record (JSON list)
    delimiter: str | None = None  # a CSV/TSV file's separator
    title: str | None = None  # how messages name the file, when not by its path (bundled data)

    @property
    def name(self) -> str:
        return self.title or str(self.path)

    def place(self, i: int) -> str:
        """`line N`, `row N` or `record N` for the i-th record (0-based)."""
        return f"line {self.lines[i]}" if self.lines is not None else f"{self.unit} {i + 1}"

    def where(self, i: int) -> str:
        """`file:N` (a line) or `file: row N` for the i-th record, as errors name it."""
        return f"{self.name}:{self.lines[i]}" if self.lines is not None else f"{self.name}: {self.place(i)}"

    def column(self, name: str, setting: str) -> pd.Series:
        if name not in self.frame.columns:
            found = ", ".join(map(str, self.frame.columns))
            if len(self.frame.columns) == 1 and self.delimiter is not None:
                raise UserError(
                    f"{self.name}: no column '{name}'; one column found with delimiter {self.delimiter!r} "
                    f"('{found}'): if the file uses another separator, set data.delimiter (or data.format)"
                )
            raise UserError(f"{self.name}: no column '{name}' (columns: {found}); set {setting}")
        return self.frame[name]


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    try:
        return EXTENSIONS[Path(path).suffix.lower()]
    except KeyError:
        raise UserError(
            f"{path}: cannot tell the format from the extension '{Path(path).suffix}'; "
            f"set data.format to one of {', '.join(FORMATS)}"
        ) from None


def read_table(
    path: str | Path,
    fmt: str | None = None,
    delimiter: str | None = None,
    setting: str = "data.path",
    title: str | None = None,
) -> Table:
    """All records of `path`, every CSV/TSV/JSON value kept as written (no type guessing for CSV).
    `title`: how messages name the file instead of its path."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise UserError(f"{path}: cannot read data file (no such file); check {setting}")
    if fmt in ("csv", "tsv"):
        table = _read_delimited(path, delimiter or ("," if fmt == "csv" else "\t"))
    elif fmt == "json":
        table = _read_json(path)
    elif fmt == "jsonl":
        table = _read_jsonl(path)
    elif fmt == "parquet":
        table = _read_parquet(path)
    else:
        table = _read_raw(path)
    if table.frame.empty:
        raise UserError(f"{path}: no records; check {setting} and data.format")
    table.title = title
    return table


def _read_delimited(path: Path, delimiter: str) -> Table:
    try:
        frame = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        read_text(path, "data file", "data.path")  # raises with the line of the first bad byte
        raise
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file; expected a header line and records") from None
    except pd.errors.ParserError as e:
        detail = " ".join(str(e).split()).removeprefix("Error tokenizing data. C error: ")
        raise UserError(
            f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({detail}); "
            f"check the quoting of that row and data.delimiter"
        ) from None
    return Table(path, frame, delimiter=delimiter)  # one column is valid (texts to classify)


def _records(path: Path, rows: Sequence[tuple[int, object]], what: str) -> Table:
    for number, row in rows:
        if not isinstance(row, dict):
            where = f"{path}:{number}" if what == "line" else f"{path}: record {number}"
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    frame = pd.DataFrame.from_records([row for _, row in rows])
    return Table(path, frame, [n for n, _ in rows] if what == "line" else None, unit=what)


def _read_json(path: Path) -> Table:
    text = read_text(path, "data file", "data.path")
    if not text.strip():
        raise UserError(f"{path}: empty file; expected a JSON list of objects")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from e
    if not isinstance(document, list):
        raise UserError(
            f"{path}: expected a JSON list of objects, got {type(document).__name__} "
            "(for one object per line use a .jsonl file or data.format=jsonl)"
        )
    return _records(path, list(enumerate(document, start=1)), "record")


def _read_jsonl(path: Path) -> Table:
    text = read_text(path, "data file", "data.path")
    return _records(path, jsonl_rows(path, text), "line")


def _read_parquet(path: Path) -> Table:
    try:
        frame = pd.read_parquet(path)
    except ImportError as e:
        raise UserError(f"{path}: reading Parquet needs pyarrow ({e}); pip install pyarrow") from e
    except Exception as e:  # pyarrow reports damaged files with its own error types
        raise UserError(f"{path}: cannot read as Parquet ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    return Table(path, frame.reset_index(drop=True))


def _read_raw(path: Path) -> Table:
    """`label<TAB>text` lines split on the first tab, with no quote handling: the book's pandas call
    treats quotes specially and silently merges rows of the SMS Spam Collection."""
    text = read_text(path, "data file", "data.path (a label<TAB>text file)")
    labels, texts, lines, blank = [], [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank.append(number)
            continue
        label, tab, message = line.partition("\t")
        if not tab:
            raise UserError(f"{path}:{number}: no tab; each line must be label<TAB>text")
        labels.append(label)
        texts.append(message)
        lines.append(number)
    if blank:
        warnings.warn(f"{path}: skipped {len(blank)} blank line(s), first at line {blank[0]}", stacklevel=3)
    return Table(path, pd.DataFrame({"label": labels, "text": texts}, dtype=object), lines)
