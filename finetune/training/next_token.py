"""The task of every language-model recipe (instructions, plain text): next-token cross-entropy."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from finetune.model.losses import IGNORE, next_token_loss


class NextTokenTask:
    """Cross-entropy summed over the targets that are not -100; loss, perplexity and tokens per split.

    Batches hold `input_ids`, `targets` (the inputs shifted by one, -100 where nothing is learned) and
    `count`, the number of real targets, counted by the collate on the host; packed batches also
    `positions` and `segments`."""

    unit = "tokens"

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return next_token_loss(model, batch["input_ids"], batch["targets"], *packing(batch))

    def count(self, batch: dict) -> int:
        return batch["count"]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for batch in loader:
            with accelerator.autocast():  # the vocabulary products too, not only the model's forward
                loss = next_token_loss(model, batch["input_ids"], batch["targets"], *packing(batch))
            total += torch.stack([loss.double(), (batch["targets"] != IGNORE).sum().double()])
        # Every process saw its own share of the split (accelerate pads the last one with repeats,
        # which are few tokens; they are counted, as in most LM evaluations).
        loss_sum, tokens = accelerator.reduce(total, reduction="sum").tolist()
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


def packing(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A packed batch's positions and segments (finetune.data.packing), or None for plain rows."""
    return batch.get("positions"), batch.get("segments")


def perplexity_table(metrics: dict, splits: tuple[str, ...] = ("train", "val", "test")) -> str:
    """Loss and perplexity of each split, as aligned text."""
    rows = [f"{'':<12}{'loss':>8}{'perplexity':>12}"]
    rows += [f"{s:<12}{metrics[s]['loss']:>8.3f}{metrics[s]['perplexity']:>12.2f}" for s in splits if s in metrics]
    return "\n".join(rows)


def perplexity_markdown(metrics: dict, splits: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
    """Loss and perplexity of each split, as the lines of a Markdown table."""
    return [
        "| split | loss | perplexity |",
        "| --- | --- | --- |",
        *(f"| {s} | {metrics[s]['loss']:.4f} | {metrics[s]['perplexity']:.2f} |" for s in splits if s in metrics),
    ]
