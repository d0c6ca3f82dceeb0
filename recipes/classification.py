"""Text classification on your own data: GPT-2 with a classification head (the book's chapter 6),
any labelled file, any number of classes.

config -> data (CSV/TSV/JSON/JSONL/Parquet or raw label<TAB>text; one file split stratified by
fractions, or separate train/val/test files; optional undersampling to the rarest class) -> model
(GPT-2 + an N-way head on the last real token) -> train (last block + final norm + head by default;
optionally class-weighted) -> evaluate (every split, per-class metrics, beside a TF-IDF + logistic
regression baseline on the same split) -> report (metrics.json, curves.png, confusion_matrix.png).
The model, its inputs, the feature cache and evaluation are those of every text-head recipe
(`finetune.recipes.text_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field

from finetune.datasets import BundledFile
from finetune.recipe_api import (
    SINGLE_LABEL,
    SPLITS,
    Example,
    FinetuneSection,
    UserError,
    classification_metrics,
    plot_confusion,
    plot_curves,
)
from finetune.recipes.labelled_data import (
    ONE_FILE,
    ClassificationData,
    LabelledData,
    balanced,
    class_names,
    index_rows,
    label_name,
    read_labelled,
    source_tables,
    split_examples,
)
from finetune.recipes.text_head import HeadConfig, HeadTrain, TextHeadRecipe, gathered_outputs, head_outputs

# -- config -------------------------------------------------------------------------------------


class ClassificationTrain(HeadTrain):
    class_weights: Literal["balanced"] | None = Field(
        None,
        description="balanced = weight each class's loss by n / (classes x count), as scikit-learn's "
        "compute_class_weight('balanced') on the training split",
    )


class ClassificationConfig(HeadConfig):
    recipe: Literal["classification"] = "classification"
    output_dir: str = "runs/classification"
    data: ClassificationData = ClassificationData()
    train: ClassificationTrain = ClassificationTrain()
    finetune: FinetuneSection = FinetuneSection(trainable="last_block")


def class_weights(train: list[Example], classes: int) -> torch.Tensor:
    """n / (classes x count per class): scikit-learn's compute_class_weight('balanced')."""
    counts = torch.bincount(torch.tensor([label for label, _ in train]), minlength=classes).double()
    if (counts == 0).any():
        raise UserError("train.class_weights=balanced: a class has no training example; add data or drop the class")
    return (counts.sum() / (classes * counts)).float()


# -- task ---------------------------------------------------------------------------------------


class ClassificationTask:
    """Cross-entropy over one label per text (optionally class-weighted); metrics from finetune.evals."""

    unit = "examples"

    def __init__(self, labels: list[str], weights: torch.Tensor | None = None, positive: int = 1) -> None:
        self.labels, self.weights, self.positive = labels, weights, positive
        self.host_weights = None if weights is None else weights.tolist()

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Summed; with class weights each example counts its class's weight, as in F.cross_entropy."""
        logits = head_outputs(model, batch).float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        return F.cross_entropy(logits, batch["labels"], weight=weights, reduction="sum")

    def count(self, batch: dict) -> float:
        """Examples, or their summed class weights: the trainer divides the loss by this."""
        if self.host_weights is None:
            return len(batch["host_labels"])
        return sum(self.host_weights[label] for label in batch["host_labels"])

    def evaluate(self, model, loader, accelerator: Accelerator) -> dict:
        logits, labels = gathered_outputs(model, loader, accelerator)
        loss = F.cross_entropy(logits, labels).item()
        return classification_metrics(labels.tolist(), logits.argmax(-1).tolist(), self.labels, loss, self.positive)


# -- the recipe ---------------------------------------------------------------------------------


class Classification(TextHeadRecipe[ClassificationConfig]):
    """One class per text. `bundled`: the data file used when a config names none (the SMS spam preset)."""

    problem_type = SINGLE_LABEL
    metric_names = ("accuracy", "f1", "macro_f1", "weighted_f1", "precision", "recall", "loss")
    headline_metric = "accuracy"

    def __init__(self, name: str, config: type[ClassificationConfig], bundled_data: BundledFile | None = None) -> None:
        self.name, self.Config, self.bundled = name, config, bundled_data

    def read(self, config: ClassificationConfig) -> LabelledData:
        d = config.data
        tables = source_tables(d, self.bundled)
        if ONE_FILE in tables:
            table = tables[ONE_FILE]
            rows = read_labelled(table, d)
            names = class_names(rows, table, d)
            examples = index_rows(rows, table, names, d.labels is not None)
            return LabelledData(split_examples(examples, names, d, config.train.seed, table.path), names)
        rows_of = {s: read_labelled(t, d) for s, t in tables.items()}
        names = class_names(rows_of["train"], tables["train"], d)
        splits = {s: index_rows(rows_of[s], tables[s], names, d.labels is not None) for s in tables}
        if d.balance:
            splits["train"] = balanced(splits["train"], len(names), config.train.seed)
        return LabelledData(splits, names)

    def outputs_meta(self, config: ClassificationConfig, data: LabelledData) -> dict:
        positive_index(config, data.labels)  # a wrong data.positive_label fails before any model is built
        return {}

    def task(self, config: ClassificationConfig, data: LabelledData, meta: dict) -> ClassificationTask:
        weights = class_weights(data.splits["train"], len(data.labels)) if config.train.class_weights else None
        return ClassificationTask(meta["labels"], weights, positive_index(config, meta["labels"]))

    def report(
        self,
        out: Path,
        config: ClassificationConfig,
        data: LabelledData,
        metrics: dict,
        history: list[dict],
        model,
        quiet: bool,
    ) -> tuple[dict, list[str]]:
        metrics["baseline"] = tfidf_baseline(data, positive_index(config, data.labels))
        plot_curves(history, out / "curves.png", metric=self.headline_metric)
        shown = "test" if "test" in metrics else "val"
        plot_confusion(
            metrics[shown]["confusion_matrix"],
            data.labels,
            out / "confusion_matrix.png",
            f"{shown.capitalize()} confusion matrix",
        )
        return metrics, ["curves.png", "confusion_matrix.png"]

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<22}{'accuracy':>10}{'f1':>8}{'macro f1':>10}{'loss':>8}"]
        named = [(f"GPT-2 {s}", metrics[s]) for s in SPLITS if s in metrics]
        baseline = metrics.get("baseline", {})
        named += [(f"TF-IDF+LR {s}", baseline[s]) for s in ("test",) if s in baseline]
        for name, m in named:
            rows.append(f"{name:<22}{m['accuracy']:>10.2%}{m['f1']:>8.3f}{m['macro_f1']:>10.3f}{m['loss']:>8.3f}")
        last = next((metrics[s] for s in ("test", "val") if s in metrics), None)
        if last and len(last["labels"]) > 2:
            rows.append(f"\n{'class':<22}{'precision':>10}{'recall':>8}{'f1':>10}{'support':>8}")
            for name, c in last["per_class"].items():
                rows.append(
                    f"{name[:21]:<22}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>10.3f}{c['support']:>8}"
                )
        return "\n".join(rows)


def positive_index(config: ClassificationConfig, labels: list[str]) -> int:
    """Binary tasks: the class whose precision/recall/F1 are reported (default: the second)."""
    if config.data.positive_label is None:
        return 1
    name = label_name(config.data.positive_label)
    if name not in labels:
        raise UserError(f"data.positive_label '{name}' is not a class ({', '.join(labels)})")
    return labels.index(name)


def tfidf_baseline(data: LabelledData, positive: int = 1) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression trained on the same training split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([text for _, text in data.splits["train"]])
    classifier = LogisticRegression(C=10.0, max_iter=1000).fit(features, [label for label, _ in data.splits["train"]])
    seen = list(classifier.classes_)  # classes with training examples, in index order
    results = {}
    for name, split in data.splits.items():
        labels = [label for label, _ in split]
        probs = np.zeros((len(split), len(data.labels)))
        probs[:, seen] = classifier.predict_proba(vectorizer.transform([text for _, text in split]))
        loss = log_loss(labels, probs, labels=list(range(len(data.labels))))
        results[name] = classification_metrics(labels, probs.argmax(1).tolist(), data.labels, loss, positive)
    return results


Config = ClassificationConfig
RECIPE = Classification("classification", ClassificationConfig)
