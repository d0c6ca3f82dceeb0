"""A classification head on GPT-2's final hidden state (the book's chapter 6 model)."""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn as nn

from finetune.model.gpt import GPT, Block

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

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits from token ids, or from `hidden`, the residual stream entering block `start` (as
        `features` returns it), read at position `index[b]` of each row.

        The last block runs at the pooled position only: the other positions' outputs would be
        thrown away, so only their keys and values are computed.
        """
        if hidden is None:
            assert input_ids is not None, "token ids or hidden states"
            hidden, index = self.gpt.embed(input_ids), self.pooled_index(input_ids, attention_mask)
        assert index is not None, "hidden states come with the position to read"
        *body, last = cast(list[Block], list(self.gpt.blocks))
        for block in body[start:]:
            hidden = self.gpt.run_block(block, hidden)
        return self.head(self.gpt.ln_f(last.forward_at(hidden, index)))

    def pooled_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The position each row is read at."""
        if self.pool == "last_token" and attention_mask is not None:
            return attention_mask.sum(dim=1) - 1
        B, T = input_ids.shape
        return torch.full((B,), T - 1, device=input_ids.device)

    def features(self, input_ids: torch.Tensor, stop: int) -> torch.Tensor:
        """The residual stream `(B, T, C)` entering block `stop`: `forward(hidden=..., start=stop)` goes on from it."""
        hidden = self.gpt.embed(input_ids)
        for block in self.gpt.blocks[:stop]:
            hidden = block(hidden)
        return hidden

    def checkpoint_meta(self) -> dict:
        return {
            **self.gpt.checkpoint_meta(),
            "task": "classification",
            "num_classes": self.num_classes,
            "pool": self.pool,
        }


Model = GPT | GPTClassifier  # what finetune trains, saves, loads and serves
