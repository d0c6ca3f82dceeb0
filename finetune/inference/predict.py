"""Predictions of a trained classifier, in the shape of its problem type: `finetune classify` (a few texts),
`finetune predict` (a file) and the server's /v1/classify all read a model's outputs here, so every way of
using a model answers alike: one class (softmax), a set of labels (sigmoid, a threshold per label),
numbers in the target's units (the stored standardisation undone), or a reward model's score of a prompt
and its response (both in the model's prompt style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from finetune.checkpoints.interface import MULTI_LABEL, REGRESSION, REWARD, SINGLE_LABEL
from finetune.data.classification_inputs import Collate, encode
from finetune.data.prompts import format_exchange
from finetune.data.tables import Table, read_table
from finetune.errors import UserError
from finetune.inference.loading import load_classifier
from finetune.model.classifier import GPTClassifier
from finetune.progress import progress


@dataclass
class Predictions:
    """A classifier's answers for some texts. `values[i, k]` is the probability of class or label `names[k]`
    (single- and multi-label), or the predicted value of target `names[k]` (regression)."""

    problem_type: str
    names: list[str]
    values: torch.Tensor  # (texts, outputs), float64; a reward model's one output is the reward
    thresholds: list[float] | None = None  # multi-label: a label is predicted when its probability reaches it

    @classmethod
    def from_logits(cls, logits: torch.Tensor, meta: dict) -> Predictions:
        problem_type, logits = meta.get("problem_type", SINGLE_LABEL), logits.double()
        if problem_type == MULTI_LABEL:
            return cls(problem_type, meta["labels"], logits.sigmoid(), [float(t) for t in meta["thresholds"]])
        if problem_type == REWARD:
            return cls(problem_type, meta["labels"], logits)
        if problem_type == REGRESSION:
            mean, std = (torch.tensor(meta[key], dtype=torch.float64) for key in ("target_mean", "target_std"))
            return cls(problem_type, meta["labels"], logits * std + mean)
        return cls(problem_type, meta["labels"], logits.softmax(-1))

    def __len__(self) -> int:
        return len(self.values)

    def chosen(self) -> torch.Tensor:
        """Multi-label: `(texts, labels)` booleans, the labels each text has."""
        assert self.thresholds is not None, "multi-label predictions"
        return self.values >= torch.tensor(self.thresholds, dtype=torch.float64)

    def label_sets(self) -> list[list[str]]:
        return [[n for n, on in zip(self.names, row, strict=True) if on] for row in self.chosen().tolist()]

    def answers(self) -> list[dict]:
        """Per text, what /v1/classify returns."""
        rows = self.values.tolist()
        if self.problem_type == REWARD:
            return [{"reward": row[0]} for row in rows]
        if self.problem_type == REGRESSION:
            return [{"values": dict(zip(self.names, row, strict=True))} for row in rows]
        probabilities = [dict(zip(self.names, row, strict=True)) for row in rows]
        if self.problem_type == MULTI_LABEL:
            return [{"labels": s, "probabilities": p} for s, p in zip(self.label_sets(), probabilities, strict=True)]
        best = self.values.argmax(-1).tolist()
        return [{"label": self.names[b], "probabilities": p} for b, p in zip(best, probabilities, strict=True)]

    def lines(self) -> list[str]:
        """Per text, what `finetune classify` prints before it: the class and its probability; the labels
        (or `-` for none) and theirs; `target=value` for each target; or the reward."""
        if self.problem_type == REWARD:
            return [f"{v:.6g}" for v in self.values[:, 0].tolist()]
        if self.problem_type == REGRESSION:
            return [" ".join(f"{n}={v:.6g}" for n, v in zip(self.names, row, strict=True)) for row in self.values]
        if self.problem_type == MULTI_LABEL:
            return [
                f"{','.join(s) or '-'}\t{','.join(f'{p:.4f}' for p, on in zip(row, ch, strict=True) if on) or '-'}"
                for s, row, ch in zip(self.label_sets(), self.values.tolist(), self.chosen().tolist(), strict=True)
            ]
        best = self.values.max(-1)
        return [f"{self.names[i]}\t{p:.4f}" for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]

    def columns(self) -> dict[str, list]:
        """The columns `finetune predict` writes after the text."""
        if self.problem_type == REWARD:
            return {"reward": self.values[:, 0].tolist()}
        if self.problem_type == REGRESSION:
            return {f"predicted_{n}": self.values[:, k].tolist() for k, n in enumerate(self.names)}
        columns: dict[str, list]
        if self.problem_type == MULTI_LABEL:
            columns = {"predicted": [",".join(s) for s in self.label_sets()]}
        else:
            best = self.values.max(-1)
            columns = {
                "predicted": [self.names[i] for i in best.indices.tolist()],
                "probability": best.values.tolist(),
            }
        return columns | {f"p_{n}": self.values[:, k].tolist() for k, n in enumerate(self.names)}


@torch.no_grad()
def predict(
    model: GPTClassifier, meta: dict, texts: list[str], batch_size: int = 32, quiet: bool = True
) -> Predictions:
    """The model's answers for `texts`, in input order (batched shortest-first)."""
    encoded = encode([(0, text) for text in texts], meta["max_length"], meta.get("keep", "start"))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))
    collate = Collate.for_pool(meta["pool"], meta["max_length"])
    logits = torch.empty(len(texts), meta["num_classes"])
    model.eval()
    for start in progress(range(0, len(order), batch_size), "predicting", quiet):
        rows = order[start : start + batch_size]
        batch = collate([encoded[i] for i in rows])
        logits[rows] = model(batch["input_ids"], batch["attention_mask"]).float()
    return Predictions.from_logits(logits, meta)


def exchanges(meta: dict, instructions: list[str], inputs: list[str], responses: list[str]) -> list[str]:
    """A reward model's texts: each prompt, in the model's prompt style, and its response."""
    style = meta["prompt_style"]
    return [format_exchange(style, i, x, r) for i, x, r in zip(instructions, inputs, responses, strict=True)]


def reward_rows(table: Table, instruction_field: str) -> dict[str, list[str]]:
    """The instruction, input (optional) and response of every row, as a reward model scores them
    (responses.jsonl has these columns)."""
    columns = {
        "instruction": table.column(instruction_field, "--text-field").tolist(),
        "response": table.column("response", "a 'response' column").tolist(),
    }
    columns["input"] = table.frame["input"].tolist() if "input" in table.frame else [""] * len(table.frame)
    for name, values in columns.items():
        for i, value in enumerate(values):
            if not isinstance(value, str) or (name != "input" and not value.strip()):
                raise UserError(
                    f"{table.where(i)}: empty or missing '{name}'; a reward model scores a prompt and a response"
                )
    return columns


def predict_file(
    source: Path,
    data: Path,
    out: Path,
    text_field: str | None = None,
    fmt: str | None = None,
    delimiter: str | None = None,
    batch_size: int = 32,
) -> int:
    """Write `out` (CSV): per input row its text (a reward model's: its instruction, input and response) and the
    model's answer (`Predictions.columns`). Returns the number of rows."""
    if out.exists():
        raise UserError(f"{out} exists; choose a new file for the predictions")
    loaded = load_classifier(str(source))
    model, meta = loaded.classifier_model, loaded.meta
    table = read_table(data, fmt, delimiter, setting="--data")
    if meta.get("problem_type") == REWARD:
        shown = reward_rows(table, text_field or "instruction")
        texts = exchanges(meta, shown["instruction"], shown["input"], shown["response"])
    else:
        shown = {"text": table.column(text_field or meta.get("text_field", "text"), "--text-field").tolist()}
        texts = shown["text"]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: empty text; every row needs a text to classify")
    predictions = predict(model, meta, texts, batch_size, quiet=False)
    frame = pd.DataFrame({**shown, **predictions.columns()})
    tmp = out.with_name(f".tmp-{out.name}")
    frame.to_csv(tmp, index=False)
    tmp.replace(out)
    return len(frame)
