"""Packing: several short sequences laid end to end in one row, so a batch holds tokens instead of padding.

GPT-2 learns absolute positions, so packing is correct only if each sequence keeps its own: positions
restart at 0 in every segment, and attention is confined to the segment (a block-diagonal causal mask,
`GPT.forward(segments=...)`). A packed row then gives every sequence the logits it gets alone, and the
targets are each sequence's own (no target crosses from one sequence into the next), so the summed loss
and its count of targets are those of the same sequences unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune.model.losses import IGNORE
from finetune.model.tokenizer import EOT_ID

Row = tuple[list[int], list[int]]  # one sequence's inputs and targets (IGNORE where nothing is learned)


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the sequences in each row, no row longer than `capacity` tokens: first fit, longest first
    (rows come out nearly full), every index in exactly one row; deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than a row's {capacity}")
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def packed_batch(rows: Sequence[Sequence[Row]]) -> dict[str, torch.Tensor]:
    """Rows of sequences laid end to end and right-padded to the longest row: `input_ids`, `targets`,
    `positions` (restarting in each sequence) and `segments` (1, 2, ... per sequence; 0 for padding)."""
    width = max(sum(len(inputs) for inputs, _ in row) for row in rows)
    ids, targets, positions, segments = [], [], [], []
    for row in rows:
        row_ids: list[int] = []
        row_targets: list[int] = []
        row_positions: list[int] = []
        row_segments: list[int] = []
        for segment, (inputs, target) in enumerate(row, start=1):
            row_ids += inputs
            row_targets += target
            row_positions += range(len(inputs))
            row_segments += [segment] * len(inputs)
        pad = width - len(row_ids)
        ids.append(row_ids + [EOT_ID] * pad)
        targets.append(row_targets + [IGNORE] * pad)
        positions.append(row_positions + [0] * pad)
        segments.append(row_segments + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "targets": torch.tensor(targets),
        "positions": torch.tensor(positions),
        "segments": torch.tensor(segments),
    }
