"""Classification metrics from labels and predictions (scikit-learn), one dict per split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(
    labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str], loss: float | None = None
) -> dict:
    """Accuracy, precision, recall, F1 and the confusion matrix (rows: true, columns: predicted).

    With two classes precision/recall/F1 are those of the positive class (index 1, e.g. spam);
    with more they are macro averages.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes = list(range(len(label_names)))
    binary = len(classes) == 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=classes, average="binary" if binary else "macro", pos_label=1, zero_division=0
    )
    metrics = {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "labels": list(label_names),
    }
    if loss is not None:
        metrics = {"loss": float(loss), **metrics}
    return metrics
