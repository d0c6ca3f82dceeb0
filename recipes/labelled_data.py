"""The data side of the text-head recipes: the `data` keys they share (files, splits, lengths), the files
read as tables, and classification's labelled rows checked row by row (missing labels, empty texts,
duplicates), named classes, and stratified or given splits."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from finetune.datasets import BundledFile, bundled
from finetune.recipe_api import Example, Float, Format, Section, Table, UserError, read_table


class LabelledFiles(Section):
    """Where labelled texts come from and how one file is split: the keys every text-head recipe shares."""

    path: str | None = Field(None, description="one file, split into train/val/test by the fractions below")
    train_path: str | None = Field(None, description="separate files instead: train_path + val_path (+ test_path)")
    val_path: str | None = None
    test_path: str | None = None
    format: Format | None = Field(
        None,
        description="csv, tsv, json, jsonl, parquet or raw (label<TAB>text "
        "lines, no header or quoting); null = from the extension",
    )
    delimiter: str | None = Field(None, description="CSV/TSV field separator; null = ',' for csv, tab for tsv")
    text_field: str = Field("text", description="column holding the text")
    val_fraction: Float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
    max_length: int | None = Field(None, ge=1, description="tokens per text; null = longest training text")
    keep: Literal["start", "end"] = Field("start", description="which end of a longer text is kept")

    @model_validator(mode="after")
    def _sources(self) -> LabelledFiles:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some training data (sum < 1)")
        if self.train_path is not None and self.path is not None:
            raise ValueError("set data.path (one file to split) or data.train_path/val_path, not both")
        if (self.train_path is None) != (self.val_path is None) or (self.test_path and not self.train_path):
            raise ValueError("separate files need data.train_path and data.val_path (data.test_path optional)")
        return self


class ClassificationData(LabelledFiles):
    label_field: str = Field("label", description="column holding the class (a string or an integer)")
    labels: list[str | int] | None = Field(
        None, min_length=2, description="the classes in head order; null = sorted from the training data"
    )
    positive_label: str | int | None = Field(
        None, description="two classes: the one whose precision/recall/F1 are reported; null = the second label"
    )
    balance: bool = Field(
        False, description="undersample every class of the training data to the rarest, as the book does for spam"
    )


@dataclass
class LabelledData:
    """Every split as (label, text) pairs - a class index, or a value per output - and the outputs' names
    (classes, labels or targets) in head order."""

    splits: dict[str, list[Example]]
    labels: list[str]


ONE_FILE = "all"  # source_tables' key for a single file that is split by fractions


def source_tables(d: LabelledFiles, bundled_file: BundledFile | None = None) -> dict[str, Table]:
    """The files to read: {ONE_FILE: table} for one file (`data.path`, else the recipe's bundled file),
    or {"train", "val"[, "test"]: table} for separate files."""
    if d.train_path is None:
        if d.path is not None:
            return {ONE_FILE: read_table(d.path, d.format, d.delimiter)}
        if bundled_file is not None:
            return {ONE_FILE: read_table(bundled(bundled_file), d.format, d.delimiter, title=bundled_file.title)}
        raise UserError(
            "no data: set data.path (one file, split by fractions) or data.train_path and "
            "data.val_path (separate files)"
        )
    paths = {"train": d.train_path, "val": d.val_path, "test": d.test_path}
    return {s: read_table(p, d.format, d.delimiter, f"data.{s}_path") for s, p in paths.items() if p}


def random_split(examples: list[Example], d: LabelledFiles, seed: int, where: str) -> dict[str, list[Example]]:
    """A seeded train/val/test split by the fractions (not stratified: a text may carry several labels or a number)."""
    from sklearn.model_selection import train_test_split

    if len(examples) < 3:
        raise UserError(f"{where}: {len(examples)} examples; a train/val/test split needs at least 3")
    rest, test = train_test_split(examples, test_size=d.test_fraction, random_state=seed)
    train, val = train_test_split(rest, test_size=d.val_fraction / (1 - d.test_fraction), random_state=seed)
    return {"train": train, "val": val, "test": test}


def label_name(value: object) -> str | None:
    """A class as text: `3`, `3.0` and `"3"` are the same class; None/NaN/blank is no label."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else str(float(value))
    text = str(value)
    return text if text.strip() else None


def sorted_labels(names: set[str]) -> list[str]:
    """Numeric classes in numeric order (2 before 10), others alphabetically."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def read_labelled(table: Table, config: ClassificationData) -> list[tuple[str, str, int]]:
    """(label name, text, row index) per record, every text and label checked."""
    texts = table.column(config.text_field, "data.text_field").tolist()
    labels = table.column(config.label_field, "data.label_field").tolist()
    rows, duplicates = [], []
    first_seen: dict[str, int] = {}
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        name = label_name(label)
        if name is None:
            raise UserError(f"{table.where(i)}: missing label in column '{config.label_field}'")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: empty text in column '{config.text_field}'")
        rows.append((name, text, i))
        if first_seen.setdefault(text, i) != i:
            duplicates.append((i, first_seen[text]))
    if duplicates:
        i, original = duplicates[0]
        warnings.warn(
            f"{table.name}: {len(duplicates)} duplicate text(s) kept, e.g. {table.place(i)} repeats "
            f"{table.place(original)}",
            stacklevel=2,
        )
    return rows


def class_names(rows: list[tuple[str, str, int]], table: Table, config: ClassificationData) -> list[str]:
    if config.labels is not None:
        listed = [label_name(v) for v in config.labels]
        names = [name for name in listed if name is not None]
        if len(set(names)) != len(listed):
            raise UserError(f"data.labels {config.labels} must be distinct, non-empty classes")
    else:
        names = sorted_labels({name for name, _, _ in rows})
    if len(names) < 2:
        raise UserError(
            f"{table.path}: only one class ('{names[0]}') in column '{config.label_field}'; "
            "classification needs two or more (check data.label_field)"
        )
    return names


def index_rows(rows: list[tuple[str, str, int]], table: Table, names: list[str], listed: bool) -> list[Example]:
    index = {name: i for i, name in enumerate(names)}
    examples: list[Example] = []
    for name, text, i in rows:
        if name not in index:
            fix = (
                "add it to data.labels or fix the row"
                if listed
                else "the training data never has it; move such rows into training or fix the label"
            )
            raise UserError(f"{table.where(i)}: unknown label '{name}' (classes: {', '.join(names)}); {fix}")
        examples.append((index[name], text))
    return examples


def split_examples(
    examples: list[Example], names: list[str], config: ClassificationData, seed: int, where: Path
) -> dict[str, list[Example]]:
    """Optional undersampling to the rarest class, then a stratified, seeded train/val/test split."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount([label for label, _ in examples], minlength=len(names))
    for name, count in zip(names, counts, strict=True):
        if count < 3:
            raise UserError(
                f"{where}: fewer than 3 examples of class '{name}' ({count}); the stratified "
                "split needs at least one per split"
            )
    if config.balance:
        examples = balanced(examples, len(names), seed)
    labels = [label for label, _ in examples]
    try:
        rest, test = train_test_split(examples, test_size=config.test_fraction, stratify=labels, random_state=seed)
        val_share = config.val_fraction / (1 - config.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=[m[0] for m in rest], random_state=seed)
    except ValueError as e:
        raise UserError(
            f"{where}: cannot split {len(examples)} examples of {len(names)} classes by "
            f"val_fraction={config.val_fraction}, test_fraction={config.test_fraction} "
            f"({' '.join(str(e).split())}); add data or change the fractions"
        ) from e
    return {"train": train, "val": val, "test": test}


def balanced(examples: list[Example], classes: int, seed: int) -> list[Example]:
    """Every class undersampled to the size of the rarest (the book's method for spam)."""
    by_label = [[m for m in examples if m[0] == i] for i in range(classes)]
    smallest = min(len(group) for group in by_label)
    rng = random.Random(seed)
    return [m for group in by_label for m in rng.sample(group, smallest)]
