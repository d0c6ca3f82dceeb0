"""Predictions of a trained classifier: `finetune classify` (a few texts), `finetune predict` (a file)
and the server's /v1/classify."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from finetune.data.classification_inputs import Collate, encode
from finetune.data.tables import read_table
from finetune.errors import UserError
from finetune.inference.loading import load_classifier
from finetune.model.classifier import GPTClassifier
from finetune.progress import progress


@torch.no_grad()
def predict(
    model: GPTClassifier, meta: dict, texts: list[str], batch_size: int = 32, quiet: bool = True
) -> torch.Tensor:
    """Class probabilities `(len(texts), classes)` in input order, batched shortest-first."""
    encoded = encode([(0, text) for text in texts], meta["max_length"], meta.get("keep", "start"))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))
    collate = Collate.for_pool(meta["pool"], meta["max_length"])
    probs = torch.empty(len(texts), meta["num_classes"])
    model.eval()
    for start in progress(range(0, len(order), batch_size), "predicting", quiet):
        rows = order[start : start + batch_size]
        batch = collate([encoded[i] for i in rows])
        probs[rows] = model(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)
    return probs


def predict_file(
    source: Path,
    data: Path,
    out: Path,
    text_field: str | None = None,
    fmt: str | None = None,
    delimiter: str | None = None,
    batch_size: int = 32,
) -> int:
    """Write `out` (CSV): per input row its text, the predicted class, its probability and every
    class's probability (`p_<class>`). Returns the number of rows."""
    if out.exists():
        raise UserError(f"{out} exists; choose a new file for the predictions")
    loaded = load_classifier(str(source))
    model, meta = loaded.classifier_model, loaded.meta
    table = read_table(data, fmt, delimiter, setting="--data")
    texts = table.column(text_field or meta.get("text_field", "text"), "--text-field").tolist()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: empty text; every row needs a text to classify")
    probs = predict(model, meta, texts, batch_size, quiet=False)
    best = probs.argmax(-1)
    frame = pd.DataFrame(
        {
            "text": texts,
            "predicted": [meta["labels"][i] for i in best.tolist()],
            "probability": probs.max(-1).values.numpy(),
        }
    )
    for i, name in enumerate(meta["labels"]):
        frame[f"p_{name}"] = probs[:, i].numpy()
    tmp = out.with_name(f".tmp-{out.name}")
    frame.to_csv(tmp, index=False)
    tmp.replace(out)
    return len(frame)
