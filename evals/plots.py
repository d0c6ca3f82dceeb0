"""Pictures of a run: training curves and a confusion matrix, as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(
    history: list[dict], path: Path, metric: str | Sequence[str] | None = None, seen: str | None = None
) -> None:
    """Train and validation loss against steps; beside it validation metrics (e.g. accuracy; also the
    training values where steps log them), or the loss against what training has seen (`seen="tokens"`:
    the book's tokens-seen axis)."""
    train = [r for r in history if r["split"] == "train"]
    val = [r for r in history if r["split"] == "val"]
    wanted = [metric] if isinstance(metric, str) else list(metric or [])
    shown_metrics = [m for m in wanted if any(m in r for r in val)]
    panels = 1 + bool(seen) + len(shown_metrics)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for ax, x in zip(axes[0], ["step", f"{seen}_seen"] if seen else ["step"], strict=False):
        # Rows of an older version lack a count; a recipe that evaluates by generation has no validation loss.
        shown = [[r for r in rows if x in r and "loss" in r] for rows in (train, val)]
        ax.plot([r[x] for r in shown[0]], [r["loss"] for r in shown[0]], label="train", alpha=0.6)
        if shown[1]:
            ax.plot([r[x] for r in shown[1]], [r["loss"] for r in shown[1]], "o-", label="validation")
        ax.set(xlabel=x.replace("_", " "), ylabel="loss", title="Loss")
        ax.legend()
    for ax, name in zip(axes[0][panels - len(shown_metrics) :], shown_metrics, strict=True):
        logged = [r for r in train if name in r]
        if logged:
            ax.plot([r["step"] for r in logged], [r[name] for r in logged], label="train", alpha=0.6)
        ax.plot([r["step"] for r in val], [r[name] for r in val], "o-", color="tab:green", label="validation")
        ax.set(xlabel="step", ylabel=name, title=f"Validation {name}" if not logged else name)
        if logged:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> None:
    """Counts per (true, predicted) class, labelled with the class names; the figure grows with the classes."""
    side = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(side + 0.5, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    if len(labels) > 3:
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
