"""Reference metrics for generated responses: ROUGE-L (Google's rouge-score) and exact match."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from rouge_score import rouge_scorer

from finetune.data.files import jsonl_rows, read_text
from finetune.errors import UserError

ROUGE_TYPE = "rougeL"


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair, as `rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`."""
    scorer = rouge_scorer.RougeScorer([ROUGE_TYPE], use_stemmer=True)
    return [
        scorer.score(reference, prediction)[ROUGE_TYPE].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the response equals the reference after lower-casing, collapsing whitespace and a final period."""
    return [float(normalize(p) == normalize(r)) for p, r in zip(predictions, references, strict=True)]


def reference_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Averages and per-example scores."""
    rouge, exact = rouge_l(predictions, references), exact_match(predictions, references)
    n = len(predictions)
    return {
        "n": n,
        "rouge_l": sum(rouge) / n if n else 0.0,
        "exact_match": sum(exact) / n if n else 0.0,
        "per_example": [{"rouge_l": r, "exact_match": e} for r, e in zip(rouge, exact, strict=True)],
    }


def read_responses(path: Path) -> list[dict]:
    """Rows of a responses.jsonl: `instruction`, `input` (or, from a chat run, the conversation's `messages`),
    `output` (reference), `response` and (since 0.3) `prompt_style`, the style the model was asked in."""
    rows = []
    for number, row in jsonl_rows(path, read_text(path, "responses", "the path (a responses.jsonl file)")):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        asked = "messages" if "messages" in row else "instruction"
        if asked == "messages" and not isinstance(row["messages"], list):
            raise UserError(f"{path}:{number}: 'messages' must be a list of messages")
        for key in ("output", "response") + (("instruction",) if asked == "instruction" else ()):
            if not isinstance(row.get(key), str):
                raise UserError(f"{path}:{number}: missing string field '{key}'")
        rows.append({"input": "", **row})
    if not rows:
        raise UserError(f"{path}: no responses")
    return rows
