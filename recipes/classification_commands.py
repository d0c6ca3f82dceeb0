"""The classification recipe's commands: `finetune classify` (a few texts) and `finetune predict` (a file).

Parsing needs nothing heavy; the recipe (and torch) is imported when a command runs.
"""

from __future__ import annotations

import argparse

from finetune.cli import positive_int
from finetune.errors import UserError


def add_commands(commands) -> None:
    cls = commands.add_parser("classify", help="label texts with a trained classifier")
    cls.add_argument("checkpoint", help="run directory or checkpoint directory")
    cls.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    cls.set_defaults(func=run_classify)

    pred = commands.add_parser("predict", help="classify every text of a file: one CSV row per input with every "
                                               "class's probability")
    pred.add_argument("checkpoint", help="run directory or checkpoint directory")
    pred.add_argument("--data", required=True, help="CSV, TSV, JSON, JSONL, Parquet or raw label<TAB>text file")
    pred.add_argument("--out", required=True, help="CSV file to write (must not exist)")
    pred.add_argument("--text-field", help="column holding the text (default: the run's data.text_field, or 'text')")
    pred.add_argument("--format", choices=["csv", "tsv", "json", "jsonl", "parquet", "raw"], help="default: from the extension")
    pred.add_argument("--delimiter", help="CSV/TSV field separator")
    pred.add_argument("--batch-size", type=positive_int, default=32)
    pred.set_defaults(func=run_predict)


def run_classify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.recipes.classification import load_classifier, predict

    if any(not text.strip() for text in args.text):
        raise UserError("--text is empty; give a text to classify")
    model, meta = load_classifier(Path(args.checkpoint))
    probs = predict(model, meta, args.text)
    for text, p in zip(args.text, probs):
        print(f"{meta['labels'][int(p.argmax())]}\t{float(p.max()):.4f}\t{text}")


def run_predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.recipes.classification import predict_file

    rows = predict_file(Path(args.checkpoint), Path(args.data), Path(args.out), args.text_field, args.format,
                        args.delimiter, args.batch_size)
    print(f"{rows} predictions written to {args.out}")
