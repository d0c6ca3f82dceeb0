"""Instruction tuning (the book's chapter 7).

config -> data (instruction/input/output records in a prompt style, Alpaca by default, 85/10/5 train/test/val
in file order as the book) -> model (GPT-2, full, last blocks or LoRA) -> train (next-token loss on
the response and one end-of-text token; optionally not on the prompt) -> evaluate (loss and
perplexity, then responses to the test split, scored against the references).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from finetune.datasets import INSTRUCTIONS, data_file
from finetune.recipe_api import (
    EOT_ID,
    IGNORE,
    Examples,
    Float,
    Format,
    Generation,
    ModelSection,
    NextTokenTask,
    Recipe,
    Record,
    Row,
    RunConfig,
    SamplingSection,
    Section,
    Setup,
    UserError,
    check_single_turn_style,
    evaluate_splits,
    get_tokenizer,
    interface_meta,
    pack,
    packed_batch,
    perplexity_table,
    plot_curves,
    prompt_tokens,
    read_records,
    read_responses,
    reference_metrics,
    respond,
    split_records,
    write_responses,
)

# -- config -------------------------------------------------------------------------------------


class InstructData(Section):
    path: str | None = Field(
        None, description="JSON list, JSONL, CSV or Parquet file; null = the bundled 1,100 instructions"
    )
    format: Format | None = Field(None, description="json, jsonl, csv, tsv or parquet; null = from the extension")
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    train_fraction: Float = Field(0.85, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.10, gt=0.0, lt=1.0)  # validation gets the rest, as in the book
    max_length: int | None = Field(None, ge=2, description="tokens per example; null = the model's context")
    mask_prompt: bool = Field(False, description="train on the response only, not on the instruction")
    packing: bool = Field(
        False,
        description="lay training records end to end in rows of up to max_length tokens (positions restart "
        "and attention stays within each record, so the loss is the same); train.batch_size then counts rows",
    )
    prompt_style: str = Field(
        "alpaca",
        description="alpaca, phi3, plain, or a template with {instruction} and "
        "optionally {input}; stored with the model (finetune.data.prompts)",
    )

    @field_validator("prompt_style")
    @classmethod
    def _style(cls, value: str) -> str:
        try:
            return check_single_turn_style(value, "prompt_style")
        except UserError as e:
            raise ValueError(str(e).removeprefix("prompt_style: ")) from None

    @model_validator(mode="after")
    def _fractions(self) -> InstructData:
        return leaves_validation(self)


def leaves_validation(data):
    """`data` (a section with train_fraction and test_fraction) if the two leave a validation split."""
    if data.train_fraction + data.test_fraction >= 1.0:
        raise ValueError("train_fraction + test_fraction must leave some validation data (sum < 1)")
    return data


class GenerationSection(SamplingSection):
    batch_size: int = Field(8, ge=1)
    stop: list[str] = Field([], description="a response ends before the first of these strings (and at end-of-text)")


class InstructConfig(RunConfig):
    recipe: Literal["instruct"] = "instruct"
    output_dir: str = "runs/instruct"
    model: ModelSection = ModelSection(name="gpt2-medium")
    data: InstructData = InstructData()
    generation: GenerationSection = GenerationSection()


Config = InstructConfig


# -- data ---------------------------------------------------------------------------------------


def read_instructions(data: InstructData) -> list[Record]:
    path = data_file(data.path, INSTRUCTIONS)
    return read_records(path, data.format, data.instruction_field, data.input_field, data.output_field)


@dataclass
class Example:
    ids: list[int]  # prompt + response tokens (no end-of-text yet)
    prompt_length: int

    @property
    def length(self) -> int:
        """Positions its training row takes (before cutting to max_length)."""
        return len(self.ids)


class Encoded(list):
    """Examples of one split: (prompt + response ids, prompt length)."""


def encode(records: list[Record], style: str) -> Encoded:
    """Prompt (in `style`) + response tokens of each record; the end-of-text is the collate's."""
    tokenizer = get_tokenizer()
    examples = Encoded()
    for record in records:
        prompt = prompt_tokens(record, style)
        examples.append(Example(prompt + tokenizer.encode_ordinary(record.output), len(prompt)))
    return examples


class Collate:
    """Right-pads with <|endoftext|>; targets are the inputs shifted by one.

    The first end-of-text is a target (the model learns to stop); later padding targets are -100,
    as are the prompt's targets with `mask_prompt`. Sequences are cut to `max_length`.
    """

    def __init__(self, max_length: int | None = None, mask_prompt: bool = False) -> None:
        self.max_length, self.mask_prompt = max_length, mask_prompt

    def row(self, e: Example) -> Row:
        """One record's inputs (its tokens) and targets (the next tokens, then one end-of-text), cut to max_length."""
        target = e.ids[1:] + [EOT_ID]
        if self.mask_prompt:
            target[: e.prompt_length - 1] = [IGNORE] * (e.prompt_length - 1)
        return e.ids[: self.max_length], target[: self.max_length]

    def __call__(self, batch: list[Example]) -> dict[str, Any]:
        rows = [self.row(e) for e in batch]
        width = max(len(inputs) for inputs, _ in rows)
        inputs = [ids + [EOT_ID] * (width - len(ids)) for ids, _ in rows]
        targets = [target + [IGNORE] * (width - len(target)) for _, target in rows]
        count = sum(t != IGNORE for row in targets for t in row)  # counted here, on the host
        return {"input_ids": torch.tensor(inputs), "targets": torch.tensor(targets), "count": count}


class PackedCollate:
    """Batches of packs (lists of records laid end to end in one row): each record's own inputs and targets,
    as `records` makes them, positions restarting per record, attention within it (finetune.data.packing)."""

    def __init__(self, records: Collate) -> None:
        self.records = records

    def __call__(self, batch: list[list[Example]]) -> dict[str, Any]:
        out: dict[str, Any] = packed_batch([[self.records.row(e) for e in pack] for pack in batch])
        out["count"] = int((out["targets"] != IGNORE).sum())
        return out


def packed(examples: list, max_length: int) -> list[list]:
    """The records (each with a `length`) in rows of up to `max_length` tokens (first fit, longest first)."""
    return [[examples[i] for i in row] for row in pack([min(e.length, max_length) for e in examples], max_length)]


def trained_tokens(examples: list, collate: Collate) -> tuple[int, int]:
    """(target tokens trained on, target positions masked) over a split."""
    trained = total = 0
    for e in examples:
        t = collate([e])["targets"]
        trained += int((t != IGNORE).sum())
        total += t.numel()
    return trained, total - trained


# -- the recipe ---------------------------------------------------------------------------------


class Instruct(Recipe[InstructConfig, dict]):
    name, Config = "instruct", InstructConfig

    def prepare(self, config: InstructConfig) -> dict[str, list[Record]]:
        return split_records(read_instructions(config.data), config.data.train_fraction, config.data.test_fraction)

    def setup(
        self, config: InstructConfig, data: dict[str, list[Record]], model, accelerator: Accelerator, quiet: bool
    ) -> Setup:
        context = model.config.context_length
        max_length = min(config.data.max_length or context, context)
        collate: Collate | PackedCollate = Collate(max_length, config.data.mask_prompt)
        encoded = {name: encode(data[name], config.data.prompt_style) for name in ("train", "val")}
        trained, masked = trained_tokens(encoded["train"], Collate(max_length, config.data.mask_prompt))
        train: Examples = encoded["train"]
        val: Examples = encoded["val"]
        if config.data.packing:  # validation records one per row, so they read as unpacked ones do
            collate = PackedCollate(Collate(max_length, config.data.mask_prompt))
            train, val = packed(encoded["train"], max_length), [[e] for e in encoded["val"]]
        if accelerator.is_main_process:
            tqdm.write(
                f"training on {trained:,} target tokens ({masked:,} masked: padding"
                f"{' and prompts' if config.data.mask_prompt else ''})"
                + (f", {len(encoded['train']):,} records packed in {len(train):,} rows" if config.data.packing else ""),
                file=sys.stderr,
            )
        meta = {"max_length": max_length, **model_interface(config)}
        return Setup(
            train,
            val,
            collate,
            NextTokenTask(),
            meta,
            on_evaluate=sample_response(data["val"][0], config, quiet),
        )

    def evaluate(
        self,
        config: InstructConfig,
        data: dict[str, list[Record]],
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        """Loss and perplexity on each split."""
        collate = Collate(meta["max_length"], config.data.mask_prompt)
        batch_size = config.train.eval_batch_size or config.train.batch_size
        return evaluate_splits(
            NextTokenTask(),
            model,
            {s: (encode(data[s], config.data.prompt_style), collate) for s in splits},
            batch_size,
            accelerator,
        )

    def report(
        self,
        out: Path,
        config: InstructConfig,
        data: dict[str, list[Record]],
        metrics: dict,
        history: list[dict],
        model,
        quiet: bool,
    ) -> tuple[dict, list[str]]:
        """Responses to the test split, scored against the references; curves.png."""
        test_responses(model, data["test"], config, out, metrics, quiet)
        plot_curves(history, out / "curves.png", seen="tokens")
        return metrics, ["responses.jsonl", "curves.png"]

    def summary_table(self, metrics: dict) -> str:
        return summary_table(metrics)

    def report_body(self, config: InstructConfig, metrics: dict, out: Path) -> list[str]:
        return response_markdown(metrics, read_responses(out / "responses.jsonl"))


RECIPE = Instruct()


def model_interface(config: InstructConfig) -> dict:
    """What a model trained by this config is: prompted in its style, answering with its generation settings."""
    return interface_meta(config.data.prompt_style, config.generation, config.train.seed)


def generation(config: InstructConfig) -> Generation:
    return Generation(**model_interface(config)["generation"])


def sample_response(sample: Record, config: InstructConfig, quiet: bool):
    def show_sample(model) -> dict:
        """The response to the first validation instruction: printed, and logged with the evaluation."""
        response = respond(model, [sample], config.data.prompt_style, generation(config))[0]
        if not quiet:
            tqdm.write(f"sample response to {sample.instruction!r}: {response!r}", file=sys.stderr)
        return {"sample": response}

    return show_sample


def test_responses(
    model, records: list[Record], config: InstructConfig, out: Path, metrics: dict, quiet: bool
) -> list[dict]:
    """responses.jsonl for the test split, and its reference metrics in `metrics["responses"]`."""
    rows = write_responses(
        model,
        records,
        config.data.prompt_style,
        generation(config),
        config.generation.batch_size,
        out / "responses.jsonl",
        quiet,
    )
    metrics["responses"] = {
        k: v
        for k, v in reference_metrics([r["response"] for r in rows], [r["output"] for r in rows]).items()
        if k != "per_example"
    }
    return rows


def summary_table(metrics: dict) -> str:
    rows = [perplexity_table(metrics)]
    if "responses" in metrics:
        r = metrics["responses"]
        rows.append(f"test responses: ROUGE-L {r['rouge_l']:.3f}, exact match {r['exact_match']:.1%} (n={r['n']})")
    return "\n".join(rows)


def response_markdown(metrics: dict, responses: list[dict], shown: int = 5) -> list[str]:
    """The test responses' scores and the first few responses beside their references."""
    lines = []
    r = metrics.get("responses")
    if r:
        lines += ["", f"Test responses (n={r['n']}): ROUGE-L {r['rouge_l']:.4f}, exact match {r['exact_match']:.2%}."]
    lines += ["", "## Sample responses", ""]
    for row in responses[:shown]:
        lines += [f"**Instruction:** {row['instruction']}", ""]
        if row["input"]:
            lines += [f"**Input:** {row['input']}", ""]
        lines += [f"**Reference:** {row['output']}", "", f"**Model:** {row['response']}", "", "---", ""]
    return lines
