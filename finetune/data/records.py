"""Instruction records from a user's table (JSON list, JSONL, CSV/TSV or Parquet, through
`finetune.data.tables`), their fields mapped by name: what instruction tuning trains on, what preference
tuning pairs, and what `finetune respond` answers."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from finetune.data.tables import read_table
from finetune.errors import UserError


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str = ""
    output: str = ""  # the reference response; empty when there is none


def read_fields(path: Path, fmt: str | None, columns: dict[str, tuple[str, str, bool]], setting: str) -> list[dict]:
    """Every record as {name: text}: `columns` maps a name to (column, how to name another column, required).
    An optional field absent from a record is ""; a required one missing, or a value that is not text,
    is refused naming the record and the setting to change. Duplicate records are counted in a warning."""
    table = read_table(path, fmt, setting=setting)
    rows = []
    for i, row in enumerate(table.frame.to_dict("records")):
        values = {}
        for name, (column, column_setting, required) in columns.items():
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                if required:
                    raise UserError(f"{table.where(i)}: missing '{column}' ({column_setting})")
                value = ""
            if not isinstance(value, str):
                raise UserError(f"{table.where(i)}: '{column}' must be a string, got {type(value).__name__}")
            values[name] = value
        rows.append(values)
    seen: dict[tuple, int] = {}
    duplicates = [
        (i, seen[key]) for i, key in enumerate(tuple(r.values()) for r in rows) if seen.setdefault(key, i) != i
    ]
    if duplicates:
        i, first = duplicates[0]
        warnings.warn(
            f"{path}: {len(duplicates)} duplicate record(s) kept, e.g. {table.place(i)} repeats {table.place(first)}",
            stacklevel=2,
        )
    return [{"where": table.where(i), **r} for i, r in enumerate(rows)]


def read_records(
    path: Path,
    fmt: str | None = None,
    instruction: str = "instruction",
    input: str = "input",
    output: str = "output",
    need_output: bool = True,
    setting: str = "data.path",
) -> list[Record]:
    """Instruction records; `output` names the reference column (optional unless `need_output`). Errors
    point at data.*_field settings, or for another `setting` (a command's option) at the names it reads."""

    def hint(name: str) -> str:
        if setting == "data.path":
            return f"set data.{name}_field if your file names it differently"
        return f"{setting} records need 'instruction', and may have 'input' and 'output'"

    columns = {
        "instruction": (instruction, hint("instruction"), True),
        "input": (input, hint("input"), False),
        "output": (output, hint("output"), need_output),
    }
    records = []
    for row in read_fields(path, fmt, columns, f"{setting} (a JSON list, JSONL, CSV or Parquet file)"):
        if not row["instruction"].strip():
            raise UserError(f"{row['where']}: empty '{instruction}'")
        records.append(Record(row["instruction"], row["input"], row["output"]))
    return records


def split_records(records: list, train_fraction: float, test_fraction: float) -> dict[str, list]:
    """Train, then test, then validation, in file order (the book's chapter 7 split)."""
    n_train = int(len(records) * train_fraction)
    n_test = int(len(records) * test_fraction)
    splits = {
        "train": records[:n_train],
        "test": records[n_train : n_train + n_test],
        "val": records[n_train + n_test :],
    }
    for name, split in splits.items():
        if not split:
            raise UserError(f"{len(records)} records leave the {name} split empty; add data or change data.*_fraction")
    return splits
