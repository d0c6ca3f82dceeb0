"""A classification head on GPT-2's final hidden state (the book's chapter 6 model)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from finetune.model import GPT

Pool = Literal["last_token", "last_position"]


class GPTClassifier(nn.Module):
    """Logits `(B, num_classes)` from the hidden state of one position per sequence.

    `last_token` reads the last real (non-padding) token, the only one that has seen the whole
    message; `last_position` reads the last position whatever it holds, as the book does. With
    right padding and causal attention, padding never changes the real tokens' states, so no
    attention mask is needed. Vocabulary logits are never computed.
    """

    def __init__(self, gpt: GPT, num_classes: int, pool: Pool = "last_token") -> None:
        super().__init__()
        if pool not in ("last_token", "last_position"):
            raise ValueError(f"unknown pool {pool!r}")
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_classes)
        self.num_classes = num_classes
        self.pool = pool

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.gpt(input_ids, return_hidden=True)
        if self.pool == "last_token" and attention_mask is not None:
            last = attention_mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            pooled = hidden[:, -1]
        return self.head(pooled)

    def checkpoint_meta(self) -> dict:
        return {**self.gpt.checkpoint_meta(), "task": "classification", "num_classes": self.num_classes, "pool": self.pool}
