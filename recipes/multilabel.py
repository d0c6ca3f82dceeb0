"""Multi-label classification: any number of labels per text (tickets with several tags, messages with
several traits).

config -> data (a column of labels, as a JSON list or text split by `data.label_separator`, or one 0/1
column per label; one file split at random by fractions, or separate files) -> model (GPT-2 + one output
per label on the last real token) -> train (binary cross-entropy per label, as transformers'
`multi_label_classification`; optionally each label's positives weighted by its negatives/positives)
-> evaluate (a label applies when its sigmoid reaches the threshold; micro/macro F1, subset accuracy,
Hamming loss, per-label precision/recall/F1, beside TF-IDF + one-vs-rest logistic regression) -> report.
The thresholds are stored with the model, so `classify`, `predict`, `serve` and exports answer alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field, model_validator

from finetune.datasets import SMS_TAGS
from finetune.recipe_api import (
    MULTI_LABEL,
    SPLITS,
    Example,
    Float,
    Table,
    UserError,
    eval_loader,
    multilabel_metrics,
    plot_curves,
)
from finetune.recipes.labelled_data import (
    ONE_FILE,
    LabelledData,
    LabelledFiles,
    label_name,
    random_split,
    source_tables,
)
from finetune.recipes.text_head import (
    TFIDF_TOKENS,
    HeadConfig,
    HeadTrain,
    TextHeadRecipe,
    gathered_outputs,
    head_outputs,
    split_inputs,
)

# -- config -------------------------------------------------------------------------------------


class MultiLabelData(LabelledFiles):
    label_field: str = Field(
        "labels", description="column holding each text's labels: a JSON list, or text split by label_separator"
    )
    label_separator: str | None = Field(
        None, description="what separates labels in label_field's text (e.g. ',' or '|'); null = a JSON list"
    )
    label_fields: list[str] | None = Field(
        None, min_length=2, description="instead of label_field: one 0/1 column per label, named by its header"
    )
    labels: list[str] | None = Field(
        None, min_length=2, description="the labels in head order; null = sorted from the training data"
    )

    @model_validator(mode="after")
    def _one_source(self) -> MultiLabelData:
        if self.label_fields is not None and self.labels is not None:
            raise ValueError("data.label_fields names the labels already; leave data.labels unset")
        return self


class MultiLabelTrain(HeadTrain):
    pos_weight: Literal["balanced"] | None = Field(
        None,
        description="balanced = weight each label's positive examples by its negatives / positives in the "
        "training split (BCEWithLogitsLoss's pos_weight), for rare labels",
    )
    threshold: Float = Field(0.5, gt=0.0, lt=1.0, description="a label applies when its probability reaches this")
    tune_thresholds: bool = Field(
        False,
        description="after training, set each label's threshold to the one that maximises its F1 on the validation "
        "split (stored with the model; validation metrics are then optimistic, test metrics are not)",
    )


class MultiLabelConfig(HeadConfig):
    recipe: Literal["multilabel"] = "multilabel"
    output_dir: str = "runs/multilabel"
    data: MultiLabelData = MultiLabelData()
    train: MultiLabelTrain = MultiLabelTrain()


# -- data ---------------------------------------------------------------------------------------

TRUE, FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}


def label_sets(table: Table, d: MultiLabelData) -> list[tuple[set[str], str]]:
    """(labels, text) per row, every text and label checked."""
    texts = table.column(d.text_field, "data.text_field").tolist()
    if d.label_fields is not None:
        columns = {name: table.column(name, "data.label_fields").tolist() for name in d.label_fields}
        labels = [
            {name for name, values in columns.items() if _flag(values[i], table, i, name)} for i in range(len(texts))
        ]
    else:
        values = table.column(d.label_field, "data.label_field").tolist()
        labels = [_names(value, table, i, d) for i, value in enumerate(values)]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: empty text in column '{d.text_field}'")
    return list(zip(labels, texts, strict=True))


def _flag(value: object, table: Table, i: int, column: str) -> bool:
    name = label_name(value)
    if name is not None and name.lower() in TRUE | FALSE:
        return name.lower() in TRUE
    raise UserError(f"{table.where(i)}: column '{column}' holds {value!r}; a label column holds 0 or 1 (or true/false)")


def _names(value: object, table: Table, i: int, d: MultiLabelData) -> set[str]:
    """A row's labels: a list (JSON, Parquet), a JSON list written as text, or text split by the separator."""
    if isinstance(value, str) and d.label_separator is None:
        if not value.strip():
            return set()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(
                f"{table.where(i)}: column '{d.label_field}' holds {value!r}, not a JSON list of labels; set "
                "data.label_separator if labels are separated by a character (e.g. ',')"
            ) from None
    items: list[object]
    if isinstance(value, str):
        items = list(value.split(d.label_separator))
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    elif label_name(value) is None:
        return set()  # a missing value: no labels
    else:
        raise UserError(f"{table.where(i)}: column '{d.label_field}' holds {value!r}; expected a list of labels")
    names = {label_name(item.strip() if isinstance(item, str) else item) for item in items}
    return {name for name in names if name is not None}


def read_label_sets(config: MultiLabelConfig, bundled_file=None) -> LabelledData:
    d = config.data
    tables = source_tables(d, bundled_file)
    rows_of = {split: label_sets(table, d) for split, table in tables.items()}
    where = {split: table.name for split, table in tables.items()}
    first = ONE_FILE if ONE_FILE in tables else "train"
    if d.label_separator is not None and d.label_fields is None:
        if not any(len(labels) > 1 for rows in rows_of.values() for labels, _ in rows):
            raise UserError(
                f"{where[first]}: data.label_separator {d.label_separator!r} splits no row of column "
                f"'{d.label_field}' into several labels; check the separator (one label per text is the "
                "classification recipe)"
            )
    names = d.label_fields or d.labels or sorted({name for labels, _ in rows_of[first] for name in labels})
    index = {name: k for k, name in enumerate(names)}
    examples: dict[str, list[Example]] = {}
    for split, rows in rows_of.items():
        examples[split] = []
        for i, (labels, text) in enumerate(rows):
            unknown = sorted(labels - index.keys())
            if unknown:
                raise UserError(
                    f"{tables[split].where(i)}: unknown label '{unknown[0]}' (labels: {', '.join(names)}); "
                    "add it to data.labels or fix the row"
                )
            examples[split].append(([1.0 if name in labels else 0.0 for name in names], text))
    splits = examples
    if ONE_FILE in examples:
        splits = random_split(examples[ONE_FILE], d, config.train.seed, where[first])
    for split, split_rows in splits.items():
        if not any(1.0 in vector for vector, _ in split_rows if isinstance(vector, list)):
            raise UserError(
                f"{where.get(split, where[first])}: no text of the {split} split has any label; check data.label_field"
            )
    counts = np.array([vector for vector, _ in splits["train"]]).sum(0)
    missing = [name for name, count in zip(names, counts, strict=True) if count == 0]
    if missing:
        raise UserError(
            f"{where.get('train', where[first])}: label '{missing[0]}' has no training example; add data or drop it"
        )
    if len(names) < 2:
        raise UserError(
            f"{where[first]}: only one label ({', '.join(names)}); one yes/no per text is the classification recipe"
        )
    return LabelledData(splits, list(names))


# -- task ---------------------------------------------------------------------------------------


class MultiLabelTask:
    """Binary cross-entropy per label on the sigmoid of each output, averaged over texts and labels
    (transformers' BCEWithLogitsLoss); metrics at the stored thresholds."""

    unit = "examples"

    def __init__(self, labels: list[str], thresholds: list[float], pos_weight: torch.Tensor | None = None) -> None:
        self.labels, self.thresholds, self.pos_weight = labels, torch.tensor(thresholds), pos_weight

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = head_outputs(model, batch).float()
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].float(), pos_weight=weight, reduction="sum")

    def count(self, batch: dict) -> float:
        return len(batch["host_labels"]) * len(self.labels)

    def evaluate(self, model, loader, accelerator: Accelerator) -> dict:
        logits, labels = gathered_outputs(model, loader, accelerator)
        labels = labels.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels).item()
        predicted = (logits.double().sigmoid() >= self.thresholds.double()).numpy()
        return multilabel_metrics(labels.numpy(), predicted, self.labels, loss)


def tuned_thresholds(probabilities: torch.Tensor, labels: torch.Tensor, default: list[float]) -> list[float]:
    """Per label, the probability cut-off with the highest F1 on these texts (the lowest of equals, placed
    halfway between two texts' probabilities; the default for a label no text has)."""
    from sklearn.metrics import precision_recall_curve

    thresholds = []
    for k, fallback in enumerate(default):
        y, p = labels[:, k].numpy(), probabilities[:, k].numpy()
        if y.sum() == 0:
            thresholds.append(float(fallback))
            continue
        precision, recall, cuts = precision_recall_curve(y, p)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-300)
        cut = cuts[int(np.argmax(f1))]
        below = p[p < cut]  # halfway to the next lower probability: the same decisions, robust to rounding
        thresholds.append(float((cut + below.max()) / 2 if below.size else cut / 2))
    return thresholds


def positive_weights(train: list[Example]) -> torch.Tensor:
    """Per label: negatives / positives in the training split."""
    flags = torch.tensor([vector for vector, _ in train], dtype=torch.float64)
    positives = flags.sum(0)
    return ((len(flags) - positives) / positives).float()


# -- the recipe ---------------------------------------------------------------------------------


class MultiLabel(TextHeadRecipe[MultiLabelConfig]):
    name = "multilabel"
    Config = MultiLabelConfig
    problem_type = MULTI_LABEL
    metric_names = (
        "micro_f1",
        "macro_f1",
        "micro_precision",
        "micro_recall",
        "subset_accuracy",
        "hamming_loss",
        "loss",
    )
    headline_metric = "micro_f1"

    def __init__(self, bundled_data=SMS_TAGS) -> None:
        self.bundled = bundled_data

    def read(self, config: MultiLabelConfig) -> LabelledData:
        return read_label_sets(config, self.bundled)

    def outputs_meta(self, config: MultiLabelConfig, data: LabelledData) -> dict:
        return {"thresholds": [config.train.threshold] * len(data.labels)}

    def task(self, config: MultiLabelConfig, data: LabelledData, meta: dict) -> MultiLabelTask:
        weights = positive_weights(data.splits["train"]) if config.train.pos_weight else None
        return MultiLabelTask(meta["labels"], meta["thresholds"], weights)

    def calibrate(self, config: MultiLabelConfig, data: LabelledData, model, meta: dict, accelerator, reuse) -> dict:
        if not config.train.tune_thresholds:
            return {}
        examples, collate = split_inputs(data, meta, ("val",), reuse)["val"]
        loader = accelerator.prepare(
            eval_loader(examples, config.train.eval_batch_size or config.train.batch_size, collate)
        )
        logits, labels = gathered_outputs(model, loader, accelerator)
        return {"thresholds": tuned_thresholds(logits.double().sigmoid(), labels.float(), meta["thresholds"])}

    def report(
        self, out: Path, config: MultiLabelConfig, data: LabelledData, metrics: dict, history, model, quiet: bool
    ) -> tuple[dict, list[str]]:
        metrics["baseline"] = tfidf_baseline(data, config.train.threshold)
        plot_curves(history, out / "curves.png", metric=self.headline_metric)
        return metrics, ["curves.png"]

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<22}{'micro f1':>10}{'macro f1':>10}{'subset acc':>12}{'hamming':>9}{'loss':>8}"]
        named = [(f"GPT-2 {s}", metrics[s]) for s in SPLITS if s in metrics]
        named += [(f"TF-IDF+LR {s}", metrics["baseline"][s]) for s in ("test",) if s in metrics.get("baseline", {})]
        for name, m in named:
            rows.append(
                f"{name:<22}{m['micro_f1']:>10.3f}{m['macro_f1']:>10.3f}{m['subset_accuracy']:>12.2%}"
                f"{m['hamming_loss']:>9.3f}{m['loss']:>8.3f}"
            )
        last = next((metrics[s] for s in ("test", "val") if s in metrics), None)
        if last:
            rows.append(f"\n{'label':<22}{'precision':>10}{'recall':>8}{'f1':>10}{'support':>8}")
            for name, c in last["per_label"].items():
                rows.append(
                    f"{name[:21]:<22}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>10.3f}{c['support']:>8}"
                )
        return "\n".join(rows)


def tfidf_baseline(data: LabelledData, threshold: float) -> dict:
    """TF-IDF (1-2 grams of words and punctuation, case kept) + one logistic regression per label, trained
    on the same training split, thresholded as the model is."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.multiclass import OneVsRestClassifier

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, **TFIDF_TOKENS)
    features = vectorizer.fit_transform([text for _, text in data.splits["train"]])
    targets = np.array([vector for vector, _ in data.splits["train"]], dtype=int)
    classifier = OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=1000)).fit(features, targets)
    results = {}
    for name, split in data.splits.items():
        labels = np.array([vector for vector, _ in split], dtype=int)
        probs = classifier.predict_proba(vectorizer.transform([text for _, text in split]))
        loss = float(np.mean([log_loss(labels[:, k], probs[:, k], labels=[0, 1]) for k in range(labels.shape[1])]))
        results[name] = multilabel_metrics(labels, (probs >= threshold).astype(int), data.labels, loss)
    return results


Config = MultiLabelConfig
RECIPE = MultiLabel()
