"""How a classifier reads texts: token ids cut to the length it was trained on, padded in batches.

The classification recipe trains on these and `finetune.inference.predict` predicts with them, so a text is read
the same way in training and in use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from finetune.model.tokenizer import EOT_ID, get_tokenizer

Label = int | list[float]  # a class index, or a value per output (several labels as 0/1, or numbers)
Example = tuple[Label, str]


@dataclass
class Encoded:
    """Token ids per text, truncated to a fixed maximum."""

    ids: list[list[int]]
    labels: list[Label]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], Label]:
        return self.ids[i], self.labels[i]


def by_length(data: Encoded) -> Encoded:
    """The same texts, shortest first, for evaluation: batches of similar lengths carry little
    padding, and metrics do not depend on the order."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    return Encoded([data.ids[i] for i in order], [data.labels[i] for i in order])


def tokenize(texts: list[str], chunk: int = 2048) -> list[list[int]]:
    """Token ids of many texts, in chunks on a thread per core (tiktoken's encoder releases the GIL).

    tiktoken's own `encode_ordinary_batch` submits one task per text: on a million short texts that
    overhead made it 5.6x slower than a plain loop (benchmarks/read_tokenize.py)."""
    encode = get_tokenizer().encode_ordinary
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    if len(chunks) <= 1:
        return [encode(text) for text in texts]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return [ids for part in pool.map(lambda part: [encode(text) for text in part], chunks) for ids in part]


def truncate(ids: list[int], max_length: int, keep: str) -> list[int]:
    return ids[:max_length] if keep == "start" else ids[-max_length:]


def encode(examples: list[Example], max_length: int, keep: str = "start") -> Encoded:
    ids = tokenize([text for _, text in examples])
    return Encoded([truncate(row, max_length, keep) for row in ids], [label for label, _ in examples])


class Collate:
    """Right-pads with <|endoftext|> to the longest text of the batch (or to `pad_to`)."""

    def __init__(self, pad_to: int | None = None) -> None:
        self.pad_to = pad_to

    @classmethod
    def for_pool(cls, pool: str, max_length: int) -> Collate:
        """The book's last-position pooling needs every text padded to the same length."""
        return cls(max_length if pool == "last_position" else None)

    def __call__(self, batch: Sequence[tuple[list[int], Label]]) -> dict[str, Any]:
        width = self.pad_to or max(len(ids) for ids, _ in batch)
        return {
            "input_ids": torch.tensor([ids + [EOT_ID] * (width - len(ids)) for ids, _ in batch]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch]),
            "labels": torch.tensor([label for _, label in batch]),
            "host_labels": [label for _, label in batch],  # for counting without waiting for the device
        }
