"""Classification metrics from labels and predictions (scikit-learn), one dict per split: one class per text,
or several labels per text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
)


def classification_metrics(
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    label_names: Sequence[str],
    loss: float | None = None,
    positive: int = 1,
) -> dict:
    """Accuracy, macro and weighted F1, per-class precision/recall/F1/support, and the confusion matrix
    (rows: true class, columns: predicted class, in `label_names` order).

    `precision`, `recall` and `f1` are those of the positive class (`positive`, e.g. spam) when there
    are two classes, and macro averages when there are more.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    headline = positive if len(classes) == 2 else slice(None)
    metrics = {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(np.mean(precision[headline])),
        "recall": float(np.mean(recall[headline])),
        "f1": float(np.mean(f1[headline])),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predictions, labels=classes, average="weighted", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "labels": list(label_names),
    }
    if loss is not None:
        metrics = {"loss": float(loss), **metrics}
    return metrics


def multilabel_metrics(
    labels: np.ndarray, predictions: np.ndarray, label_names: Sequence[str], loss: float | None = None
) -> dict:
    """Several labels per text, as `(texts, labels)` 0/1 arrays: micro and macro F1 (and precision, recall),
    subset accuracy (every label of a text right), Hamming loss (the share of wrong label decisions) and
    per-label precision/recall/F1/support (support: texts that have the label)."""
    labels, predictions = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, average=None, zero_division=0)
    micro = precision_recall_fscore_support(labels, predictions, average="micro", zero_division=0)
    metrics = {
        "n": int(len(labels)),
        "micro_f1": float(micro[2]),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "subset_accuracy": float(accuracy_score(labels, predictions)),
        "hamming_loss": float(hamming_loss(labels, predictions)),
        "per_label": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
        },
        "labels": list(label_names),
    }
    if loss is not None:
        metrics = {"loss": float(loss), **metrics}
    return metrics
