"""Instruction tuning, Alpaca style (the book's chapter 7).

config -> data (instruction/input/output records, the Alpaca prompt template, 85/10/5 train/test/val
in file order as the book) -> model (GPT-2, full, last blocks or LoRA) -> train (next-token loss on
the response and one end-of-text token; optionally not on the prompt) -> evaluate (loss and
perplexity, then responses to the test split, scored against the references).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from finetune.checkpoint import write_text_atomic
from finetune.config import Float, ModelSection, RunConfig, SamplingSection, Section, load_config
from finetune.data import INSTRUCTIONS, bundled
from finetune.errors import UserError
from finetune.evals.generation import reference_metrics
from finetune.evals.plots import plot_curves
from finetune.generate import generate
from finetune.losses import IGNORE
from finetune.next_token import NextTokenTask
from finetune.progress import progress
from finetune.recipes.base import SPLITS, Recipe, Setup, language_model
from finetune.tables import Format, read_table
from finetune.tokenizer import EOT_ID, get_tokenizer
from finetune.trainer import eval_loader

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


# -- config -------------------------------------------------------------------------------------


class InstructData(Section):
    path: str | None = Field(None, description="JSON list, JSONL, CSV or Parquet file; null = the bundled 1,100 instructions")
    format: Format | None = Field(None, description="json, jsonl, csv, tsv or parquet; null = from the extension")
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    train_fraction: Float = Field(0.85, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.10, gt=0.0, lt=1.0)  # validation gets the rest, as in the book
    max_length: int | None = Field(None, ge=2, description="tokens per example; null = the model's context")
    mask_prompt: bool = Field(False, description="train on the response only, not on the instruction")

    @model_validator(mode="after")
    def _fractions(self) -> "InstructData":
        if self.train_fraction + self.test_fraction >= 1.0:
            raise ValueError("train_fraction + test_fraction must leave some validation data (sum < 1)")
        return self


class GenerationSection(SamplingSection):
    batch_size: int = Field(8, ge=1)


class InstructConfig(RunConfig):
    recipe: Literal["instruct"] = "instruct"
    output_dir: str = "runs/instruct"
    model: ModelSection = ModelSection(name="gpt2-medium")
    data: InstructData = InstructData()
    generation: GenerationSection = GenerationSection()


Config = InstructConfig


def instruct_run_config(path: Path) -> InstructConfig | None:
    """An instruct run directory's config; None for any other path (another recipe's run included)."""
    from finetune.recipes import run_recipe  # the recipe registry imports this module

    if not (Path(path) / "config.yaml").is_file() or run_recipe(Path(path)).name != "instruct":
        return None
    return load_config(InstructConfig, Path(path) / "config.yaml")


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


def format_prompt(record: Record) -> str:
    """The Alpaca template up to the response (the book's `format_input` + the response header)."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record.instruction}"
    if record.input:
        text += f"\n\n### Input:\n{record.input}"
    return text + "\n\n### Response:\n"


def read_records(path: Path, fields: InstructData) -> list[Record]:
    """Records from a JSON list, JSONL, CSV/TSV or Parquet file (finetune.tables), field names mapped as
    configured."""
    table = read_table(path, fields.format, setting="data.path (a JSON list, JSONL, CSV or Parquet file)")
    records = [_record(table.where(i), row, fields) for i, row in enumerate(table.frame.to_dict("records"))]
    seen: dict[Record, int] = {}
    duplicates = [(i, seen[r]) for i, r in enumerate(records) if seen.setdefault(r, i) != i]
    if duplicates:
        i, first = duplicates[0]
        warnings.warn(f"{path}: {len(duplicates)} duplicate record(s) kept, e.g. {table.place(i)} repeats "
                      f"{table.place(first)}", stacklevel=2)
    return records


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # a key absent from some records


def _record(where: str, row: dict, fields: InstructData) -> Record:
    values = {}
    for key, name, required in ((fields.instruction_field, "instruction", True), (fields.input_field, "input", False),
                                (fields.output_field, "output", True)):
        value = row.get(key)
        if _missing(value):
            if required:
                raise UserError(f"{where}: missing '{key}' (set data.{name}_field if your file names it differently)")
            value = ""
        if not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        values[name] = value
    if not values["instruction"].strip():
        raise UserError(f"{where}: empty '{fields.instruction_field}'")
    return Record(**values)


def data_path(config: InstructData) -> Path:
    return Path(config.path) if config.path is not None else bundled(INSTRUCTIONS)


def split_records(records: list[Record], config: InstructData) -> dict[str, list[Record]]:
    """Train, then test, then validation, in file order (the book's split)."""
    n_train = int(len(records) * config.train_fraction)
    n_test = int(len(records) * config.test_fraction)
    splits = {"train": records[:n_train], "test": records[n_train : n_train + n_test], "val": records[n_train + n_test :]}
    for name, split in splits.items():
        if not split:
            raise UserError(f"{len(records)} records leave the {name} split empty; add data or change data.*_fraction")
    return splits


@dataclass
class Example:
    ids: list[int]  # prompt + response tokens (no end-of-text yet)
    prompt_length: int


class Encoded(list):
    """Examples of one split: (prompt + response ids, prompt length)."""


def encode(records: list[Record]) -> Encoded:
    tokenizer = get_tokenizer()
    examples = Encoded()
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record))
        examples.append(Example(prompt + tokenizer.encode_ordinary(record.output), len(prompt)))
    return examples


class Collate:
    """Right-pads with <|endoftext|>; targets are the inputs shifted by one.

    The first end-of-text is a target (the model learns to stop); later padding targets are -100,
    as are the prompt's targets with `mask_prompt`. Sequences are cut to `max_length`.
    """

    def __init__(self, max_length: int | None = None, mask_prompt: bool = False) -> None:
        self.max_length, self.mask_prompt = max_length, mask_prompt

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.ids) for e in batch) + 1  # room for one end-of-text
        inputs, targets = [], []
        for e in batch:
            padded = e.ids + [EOT_ID] * (width - len(e.ids))
            target = padded[1:]
            target[len(e.ids) :] = [IGNORE] * (len(target) - len(e.ids))  # keeps target[len-1] = EOT
            if self.mask_prompt:
                target[: e.prompt_length - 1] = [IGNORE] * (e.prompt_length - 1)
            inputs.append(padded[:-1][: self.max_length])
            targets.append(target[: self.max_length])
        count = sum(t != IGNORE for row in targets for t in row)  # counted here, on the host
        return {"input_ids": torch.tensor(inputs), "targets": torch.tensor(targets), "count": count}


def trained_tokens(examples: Encoded, collate: Collate) -> tuple[int, int]:
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
        return split_records(read_records(data_path(config.data), config.data), config.data)

    def build_model(self, config: InstructConfig, data: dict) -> torch.nn.Module:
        return language_model(config)

    def setup(self, config: InstructConfig, data: dict[str, list[Record]], model, accelerator: Accelerator,
              quiet: bool) -> Setup:
        context = model.config.context_length
        max_length = min(config.data.max_length or context, context)
        collate = Collate(max_length, config.data.mask_prompt)
        encoded = {name: encode(data[name]) for name in ("train", "val")}
        trained, masked = trained_tokens(encoded["train"], collate)
        if accelerator.is_main_process:
            tqdm.write(f"training on {trained:,} target tokens ({masked:,} masked: padding"
                       f"{' and prompts' if config.data.mask_prompt else ''})", file=sys.stderr)
        sample = data["val"][0]

        def show_sample(model) -> dict:
            """The response to the first validation instruction: printed, and logged with the evaluation."""
            response = respond(model, [sample], config)[0]
            if not quiet:
                tqdm.write(f"sample response to {sample.instruction!r}: {response!r}", file=sys.stderr)
            return {"sample": response}

        return Setup(encoded["train"], encoded["val"], collate, NextTokenTask(), {"max_length": max_length},
                     on_evaluate=show_sample)

    def evaluate(self, config: InstructConfig, data: dict[str, list[Record]], model, meta: dict,
                 splits: tuple[str, ...], accelerator: Accelerator, reuse: dict) -> dict:
        """Loss and perplexity on each split."""
        collate = Collate(meta["max_length"], config.data.mask_prompt)
        batch_size = config.train.eval_batch_size or config.train.batch_size
        return {split: NextTokenTask().evaluate(model, accelerator.prepare(eval_loader(encode(data[split]), batch_size, collate)),
                                               accelerator) for split in splits}

    def report(self, out: Path, config: InstructConfig, data: dict[str, list[Record]], metrics: dict,
               history: list[dict], model, quiet: bool) -> tuple[dict, list[str]]:
        """Responses to the test split, scored against the references; report.md and curves.png."""
        responses = write_responses(model, data["test"], config, out / "responses.jsonl", quiet)
        metrics["responses"] = {k: v for k, v in reference_metrics(
            [r["response"] for r in responses], [r["output"] for r in responses]).items() if k != "per_example"}
        write_text_atomic(out / "report.md", report_markdown(config, metrics, responses))
        plot_curves(history, out / "curves.png", seen="tokens")
        return metrics, ["responses.jsonl", "report.md", "curves.png"]

    def summary_table(self, metrics: dict) -> str:
        return summary_table(metrics)


RECIPE = Instruct()


def respond(model, records: list[Record], config: InstructConfig) -> list[str]:
    """Responses to records, batched through the KV-cache generator, each stopped at end-of-text."""
    gen = config.generation
    tokenizer = get_tokenizer()
    prompts = [tokenizer.encode_ordinary(format_prompt(r)) for r in records]
    context = model.config.context_length
    for record, prompt in zip(records, prompts):
        if len(prompt) >= context:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit the context of {context} "
                            f"(instruction {record.instruction[:40]!r}…); shorten it")
    budget = min(gen.max_new_tokens, context - max(len(p) for p in prompts))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(config.train.seed)
    out = generate(model, prompts, budget, gen.temperature, gen.top_k, gen.top_p, EOT_ID, generator)
    return [tokenizer.decode([t for t in row[len(p):] if t != EOT_ID]).strip() for row, p in zip(out, prompts)]


def write_responses(model, records: list[Record], config: InstructConfig, path: Path, quiet: bool = True) -> list[dict]:
    size = config.generation.batch_size
    rows = []
    batches = range(0, len(records), size)
    for start in progress(batches, "responding", quiet):
        batch = records[start : start + size]
        for record, response in zip(batch, respond(model, batch, config)):
            rows.append({"instruction": record.instruction, "input": record.input, "output": record.output, "response": response})
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def summary_table(metrics: dict) -> str:
    rows = [f"{'':<12}{'loss':>8}{'perplexity':>12}"]
    for split in SPLITS:
        if split in metrics:
            rows.append(f"{split:<12}{metrics[split]['loss']:>8.3f}{metrics[split]['perplexity']:>12.2f}")
    if "responses" in metrics:
        r = metrics["responses"]
        rows.append(f"test responses: ROUGE-L {r['rouge_l']:.3f}, exact match {r['exact_match']:.1%} (n={r['n']})")
    return "\n".join(rows)


def report_markdown(config: InstructConfig, metrics: dict, responses: list[dict], shown: int = 5) -> str:
    lines = [f"# Instruction tuning: {config.model.name} ({config.finetune.trainable})", "",
             "| split | loss | perplexity |", "| --- | --- | --- |"]
    lines += [f"| {s} | {metrics[s]['loss']:.4f} | {metrics[s]['perplexity']:.2f} |" for s in SPLITS if s in metrics]
    r = metrics.get("responses")
    if r:
        lines += ["", f"Test responses (n={r['n']}): ROUGE-L {r['rouge_l']:.4f}, exact match {r['exact_match']:.2%}."]
    lines += ["", "## Sample responses", ""]
    for row in responses[:shown]:
        lines += [f"**Instruction:** {row['instruction']}", ""]
        if row["input"]:
            lines += [f"**Input:** {row['input']}", ""]
        lines += [f"**Reference:** {row['output']}", "", f"**Model:** {row['response']}", "", "---", ""]
    return "\n".join(lines)
