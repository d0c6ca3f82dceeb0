"""Frozen-trunk feature caching for classifiers.

When everything below the first trainable block is frozen and dropout is off, those layers compute
the same activations for an example in every epoch and every evaluation. `cache_features` runs them
once per example and keeps the residual stream entering the first trainable block, up to the
position the classifier reads; training and evaluation start from there. Results equal an uncached
run up to floating-point rounding: the cached pass batches examples by length, and matrix products
of other shapes may round differently in the last bit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from finetune.data.classification_inputs import Label
from finetune.model.classifier import GPTClassifier
from finetune.progress import progress
from finetune.training.trainer import Examples


def cacheable_blocks(model: GPTClassifier) -> int:
    """How many blocks at the bottom of the trunk give the same output every time (frozen, no
    dropout); 0 when nothing can be cached. The last block is never cached: the classifier runs
    it at the pooled position only."""
    gpt = model.gpt
    embeddings = [*gpt.wte.parameters(), *gpt.wpe.parameters()]
    if gpt.config.dropout > 0 or any(p.requires_grad for p in embeddings):
        return 0
    count = 0
    for block in gpt.blocks[:-1]:
        if any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


@dataclass
class CachedFeatures(Dataset):
    """Per example: the residual stream entering block `start` at positions 0..pooled `(n, C)`, and its label
    (a class index, or a value per output)."""

    hidden: list[torch.Tensor]
    labels: list[Label]
    start: int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Label]:
        return self.hidden[i], self.labels[i]

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


class CollateFeatures:
    """Right-pads cached streams with zeros: positions after a row's pooled one are never attended to."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self, batch: list[tuple[torch.Tensor, Label]]) -> dict:
        lengths = [len(hidden) for hidden, _ in batch]
        hidden = torch.nn.utils.rnn.pad_sequence([h for h, _ in batch], batch_first=True)
        return {
            "hidden": hidden,
            "index": torch.tensor(lengths, device=hidden.device) - 1,
            "labels": torch.tensor([label for _, label in batch], device=hidden.device),
            "host_labels": [label for _, label in batch],
            "start": self.start,
        }


@torch.no_grad()
def cache_features(
    model: GPTClassifier,
    dataset: Examples,
    collate: Callable[[list], dict],
    blocks: int,
    batch_size: int,
    accelerator: Accelerator,
    desc: str,
    quiet: bool = False,
) -> CachedFeatures:
    """Run `model`'s first `blocks` blocks once over `dataset` (items `(token ids, label)`, batched
    by `collate` as in training) on the accelerator's device, under its mixed precision."""
    model.to(accelerator.device).eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))  # little padding per batch
    hidden: list[torch.Tensor] = [torch.empty(0)] * len(dataset)  # each row filled below
    labels = [dataset[i][1] for i in range(len(dataset))]
    show = not quiet and accelerator.is_main_process
    for first in progress(range(0, len(order), batch_size), desc, quiet=not show):
        rows = order[first : first + batch_size]
        batch = collate([dataset[i] for i in rows])
        input_ids = batch["input_ids"].to(accelerator.device)
        attention_mask = batch["attention_mask"].to(accelerator.device)
        with accelerator.autocast():
            stream = model.features(input_ids, blocks)
        for row, (i, last) in enumerate(zip(rows, model.pooled_index(input_ids, attention_mask).tolist(), strict=True)):
            hidden[i] = stream[row, : last + 1].clone()
    return CachedFeatures(hidden, labels, blocks)


def cache_splits(
    model: GPTClassifier,
    splits: Mapping[str, Examples],
    collate: Callable[[list], dict],
    batch_size: int,
    accelerator: Accelerator,
    quiet: bool = False,
) -> dict[str, CachedFeatures]:
    """Cached features of every split, or {} when the model's trunk has nothing cacheable."""
    blocks = cacheable_blocks(model)
    if not blocks:
        return {}
    began = time.perf_counter()
    cached = {
        name: cache_features(model, data, collate, blocks, batch_size, accelerator, f"caching {name} features", quiet)
        for name, data in splits.items()
    }
    if accelerator.is_main_process:
        size = sum(c.nbytes() for c in cached.values()) / 2**20
        examples = sum(len(c) for c in cached.values())
        tqdm.write(
            f"feature cache: blocks 0-{blocks - 1} are frozen; their output for {examples:,} examples "
            f"({size:,.1f} MiB) computed once in {time.perf_counter() - began:.1f} s",
            file=sys.stderr,
        )
    return cached
