"""Preference pairs, as DPO and reward models read them: records with an instruction, an optional input, a
`chosen` and a `rejected` response, checked row by row; each pair's two responses after its prompt as token
ids; and batches of pairs, padded (chosen rows first) or packed (`data.packing`: pairs kept whole in rows of
up to max_length, each response's position and attention its own, `slots` naming where each one is)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from finetune.datasets import PREFERENCES, data_file
from finetune.recipe_api import (
    EOT_ID,
    IGNORE,
    Record,
    Row,
    UserError,
    get_tokenizer,
    pack,
    packed_batch,
    prompt_tokens,
    read_fields,
)


@dataclass(frozen=True)
class Pair:
    record: Record  # the instruction, its input, and `chosen` as the reference output
    chosen: str
    rejected: str
    where: str  # file and record, for errors


class PairSource(Protocol):
    """Where preference records are and what their columns are called (DPO's and the reward model's data)."""

    @property
    def path(self) -> str | None: ...
    @property
    def format(self) -> str | None: ...
    @property
    def instruction_field(self) -> str: ...
    @property
    def input_field(self) -> str: ...
    @property
    def chosen_field(self) -> str: ...
    @property
    def rejected_field(self) -> str: ...


def read_pairs(data: PairSource, output_field: str | None = None) -> list[Pair]:
    """Preference records, checked: both responses present and non-empty; identical ones counted. Each
    record's reference output is `output_field`'s column, else the chosen response."""
    path = data_file(data.path, PREFERENCES)
    hint = "set data.{}_field if your file names it differently".format
    columns = {
        "instruction": (data.instruction_field, hint("instruction"), True),
        "input": (data.input_field, hint("input"), False),
        "chosen": (data.chosen_field, hint("chosen"), True),
        "rejected": (data.rejected_field, hint("rejected"), True),
        "output": (output_field or data.chosen_field, hint("output"), False),
    }
    pairs, same = [], []
    for row in read_fields(path, data.format, columns, "data.path (a JSON list, JSONL, CSV or Parquet file)"):
        for name in ("instruction", "chosen", "rejected"):
            if not row[name].strip():
                raise UserError(
                    f"{row['where']}: empty '{columns[name][0]}'; every record needs an instruction and two responses"
                )
        if row["chosen"] == row["rejected"]:
            same.append(row["where"])
        record = Record(row["instruction"], row["input"], row["output"] or row["chosen"])
        pairs.append(Pair(record, row["chosen"], row["rejected"], row["where"]))
    if same:
        example = same[0].removeprefix(str(path)).lstrip(": ")
        warnings.warn(
            f"{path}: {len(same)} record(s) with chosen equal to rejected, e.g. {example}: they teach "
            "nothing (their loss stays ln 2)",
            stacklevel=2,
        )
    return pairs


@dataclass
class Encoded:
    """One pair's token ids: prompt + chosen and prompt + rejected, each with its end-of-text."""

    chosen: list[int]
    rejected: list[int]
    prompt_length: int


def encode_pairs(pairs: list[Pair], style: str, max_length: int) -> list[Encoded]:
    """Prompt + response + end-of-text, cut to `max_length`; a prompt that leaves no room is refused."""
    tokenizer = get_tokenizer()
    encoded = []
    for pair in pairs:
        prompt = prompt_tokens(pair.record, style)
        if len(prompt) >= max_length:
            raise UserError(
                f"{pair.where}: the prompt is {len(prompt)} tokens, leaving no room for a response in "
                f"{max_length} (data.max_length or the context); shorten it or raise data.max_length"
            )
        chosen, rejected = (
            prompt + tokenizer.encode_ordinary(text) + [EOT_ID] for text in (pair.chosen, pair.rejected)
        )
        encoded.append(Encoded(chosen, rejected, prompt_length=len(prompt)))
    return encoded


class Collate:
    """A batch of pairs as one batch of sequences, chosen rows first: right-padded, with targets -100
    on the prompt and the padding, so only the response and its end-of-text count. Each example is
    (pair, its reference log-probabilities (chosen, rejected), or None before they are known)."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def sequence(self, ids: list[int], prompt_length: int) -> Row:
        """One response's inputs and targets (the response and its end-of-text; not the prompt), cut to max_length."""
        ids = ids[: self.max_length + 1]
        target = ids[1:]
        target[: prompt_length - 1] = [IGNORE] * (prompt_length - 1)
        return ids[:-1], target

    def __call__(self, batch: list[tuple[Encoded, torch.Tensor | None]]) -> dict:
        rows = [self.sequence(e.chosen, e.prompt_length) for e, _ in batch]
        rows += [self.sequence(e.rejected, e.prompt_length) for e, _ in batch]
        width = max(len(inputs) for inputs, _ in rows)
        inputs = [ids + [EOT_ID] * (width - len(ids)) for ids, _ in rows]
        targets = [target + [IGNORE] * (width - len(target)) for _, target in rows]
        return {"input_ids": torch.tensor(inputs), "targets": torch.tensor(targets), **pair_fields(batch, rows)}


def pair_fields(batch: list[tuple[Encoded, torch.Tensor | None]], rows: list[Row]) -> dict:
    """What a batch of pairs carries beside its tokens: the pair count, each response's target count (chosen
    responses first) and, once known, the reference's log-probabilities."""
    out: dict = {"count": len(batch), "target_counts": torch.tensor([sum(t != IGNORE for t in r) for _, r in rows])}
    if batch[0][1] is not None:
        out["reference"] = torch.stack([ref for _, ref in batch if ref is not None])
    return out


class PackedCollate:
    """Batches of packs of pairs (`data.packing`): each pack's responses laid end to end in one row (a pair
    too long for one row: its two responses in a row each), positions restarting per response, attention
    inside it; `slots` names each response's (row, segment), chosen ones first."""

    def __init__(self, max_length: int) -> None:
        self.pairs = Collate(max_length)
        self.max_length = max_length

    def responses(self, e: Encoded) -> tuple[Row, Row]:
        return self.pairs.sequence(e.chosen, e.prompt_length), self.pairs.sequence(e.rejected, e.prompt_length)

    def __call__(self, batch: list[list[tuple[Encoded, torch.Tensor | None]]]) -> dict:
        rows: list[list[Row]] = []
        chosen: list[tuple[int, int]] = []
        rejected: list[tuple[int, int]] = []
        for group in batch:
            sequences = [self.responses(e) for e, _ in group]
            if sum(len(c[0]) + len(r[0]) for c, r in sequences) <= self.max_length:
                rows.append([s for pair in sequences for s in pair])
                chosen += [(len(rows) - 1, 2 * i + 1) for i in range(len(sequences))]
                rejected += [(len(rows) - 1, 2 * i + 2) for i in range(len(sequences))]
            else:  # one pair longer than a row
                rows += [[sequences[0][0]], [sequences[0][1]]]
                chosen.append((len(rows) - 2, 1))
                rejected.append((len(rows) - 1, 1))
        out = packed_batch(rows)
        out["slots"] = torch.tensor(chosen + rejected)
        pairs = [item for group in batch for item in group]
        responses = [rows[r][s - 1] for r, s in chosen + rejected]
        return out | pair_fields(pairs, responses)


def packed_pairs(examples: list[tuple[Encoded, torch.Tensor | None]], max_length: int) -> list[list]:
    """The pairs in packs whose responses fill rows of up to `max_length` tokens (first fit, longest first)."""
    lengths = [min(len(e.chosen) - 1, max_length) + min(len(e.rejected) - 1, max_length) for e, _ in examples]
    return [[examples[i] for i in row] for row in pack([min(n, max_length) for n in lengths], max_length)]
