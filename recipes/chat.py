"""Conversations: instruction tuning on chat data (OpenAI's fine-tuning format, ShareGPT, `messages` datasets).

config -> data (conversations checked as OpenAI checks an upload, bad ones counted per kind or refused with
data.strict; 85/10/5 train/test/val in file order) -> model (GPT-2, full, last blocks or LoRA) -> train
(next-token loss on the assistant turns, their end marker included; or on the last turn, or everything) ->
evaluate (loss and perplexity, then the last assistant turn of each test conversation answered and scored
against the reference). The model keeps its chat format, so `chat`, `serve` and every export talk in turns.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from accelerate import Accelerator
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from finetune.datasets import CONVERSATIONS, data_file
from finetune.recipe_api import (
    IGNORE,
    Conversation,
    ConversationTokens,
    Float,
    Format,
    Generation,
    ModelSection,
    NextTokenTask,
    Recipe,
    RunConfig,
    Screening,
    Section,
    Setup,
    UserError,
    can_converse,
    check_style,
    encode_screened,
    evaluate_splits,
    interface_meta,
    message_text,
    plot_curves,
    read_conversations,
    reference_metrics,
    reply,
    split_records,
    stop_strings,
    write_replies,
)
from finetune.recipes.instruct import (
    Collate,
    GenerationSection,
    PackedCollate,
    leaves_validation,
    packed,
    summary_table,
    trained_tokens,
)

# -- config -------------------------------------------------------------------------------------


class ChatData(Section):
    path: str | None = Field(
        None,
        description="JSONL, JSON list or Parquet file of conversations; null = the bundled 550 two-turn "
        "conversations (bundled:conversations; bundled:conversations-sharegpt is the same in ShareGPT's shape)",
    )
    format: Format | None = Field(None, description="jsonl, json or parquet; null = from the extension")
    messages_field: str | None = Field(None, description="the column of messages; null = messages or conversations")
    chat_format: str = Field(
        "chatml",
        description="chatml, alpaca, phi3, a Jinja chat template, or a .jinja file holding one; stored with the "
        "model (finetune.data.prompts)",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        "assistant",
        description="assistant: every assistant turn (OpenAI's weight 0 skips one); last: the last one; all: "
        "every token, system and user turns included",
    )
    strict: bool = Field(False, description="refuse the run at the first bad conversation instead of skipping it")
    train_fraction: Float = Field(0.85, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.10, gt=0.0, lt=1.0)
    max_length: int | None = Field(None, ge=2, description="tokens per conversation; null = the model's context")
    packing: bool = Field(
        False,
        description="lay training conversations end to end in rows of up to max_length tokens (positions restart "
        "and attention stays within each one); train.batch_size then counts rows",
    )

    @field_validator("chat_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value.endswith(".jinja"):
            try:
                value = Path(value).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"cannot read the chat template file {value} ({e.strerror})") from None
        try:
            check_style(value, "chat_format")
        except UserError as e:
            raise ValueError(str(e).removeprefix("chat_format: ")) from None
        if not can_converse(value):
            raise ValueError(f"'{value}' holds one turn; use chatml, alpaca, phi3 or a Jinja chat template")
        return value

    @model_validator(mode="after")
    def _fractions(self) -> ChatData:
        return leaves_validation(self)


class ChatConfig(RunConfig):
    recipe: Literal["chat"] = "chat"
    output_dir: str = "runs/chat"
    model: ModelSection = ModelSection(name="gpt2-medium")
    data: ChatData = ChatData()
    generation: GenerationSection = GenerationSection()


Config = ChatConfig


# -- data ---------------------------------------------------------------------------------------


class TurnsCollate(Collate):
    """Rows of whole conversations: inputs every token but the last, targets the next tokens where trained."""

    def row(self, e: ConversationTokens) -> tuple[list[int], list[int]]:
        targets = [t if trained else IGNORE for t, trained in zip(e.ids[1:], e.trained[1:], strict=True)]
        return e.ids[:-1][: self.max_length], targets[: self.max_length]


def fitting(
    conversations: list[Conversation], config: ChatConfig, max_length: int, screening: Screening
) -> list[tuple[Conversation, ConversationTokens]]:
    """The conversations with their tokens; those too long or refused by the template counted in `screening`."""
    return encode_screened(conversations, config.data.chat_format, config.data.train_on, max_length, screening)


def encoded(conversations: list[Conversation], config: ChatConfig, max_length: int, screening: Screening) -> list:
    return [tokens for _, tokens in fitting(conversations, config, max_length, screening)]


# -- the recipe ---------------------------------------------------------------------------------


@dataclass
class Conversations:
    """The file's conversations split 85/10/5, and what its screening skipped (reported when training starts)."""

    splits: dict[str, list[Conversation]]
    screening: Screening


class Chat(Recipe[ChatConfig, Conversations]):
    name, Config = "chat", ChatConfig

    def prepare(self, config: ChatConfig) -> Conversations:
        path = data_file(config.data.path, CONVERSATIONS)
        screening = read_conversations(path, config.data.format, config.data.messages_field, config.data.strict)
        if not screening.kept:
            raise UserError(f"{path}: no conversation can be trained on ({'; '.join(screening.lines())})")
        splits = split_records(screening.kept, config.data.train_fraction, config.data.test_fraction)
        return Conversations(splits, screening)

    def setup(self, config: ChatConfig, data: Conversations, model, accelerator: Accelerator, quiet: bool) -> Setup:
        context = model.config.context_length
        max_length = min(config.data.max_length or context, context)
        screening = data.screening
        train, val = (encoded(data.splits[name], config, max_length, screening) for name in ("train", "val"))
        if not train or not val:
            raise UserError(
                f"no {'training' if not train else 'validation'} conversation fits; {'; '.join(screening.lines())}"
            )
        collate: Collate | PackedCollate = TurnsCollate(max_length)
        trained, masked = trained_tokens(train, collate)
        rows: list = train
        if config.data.packing:  # validation conversations one per row, so they read as unpacked ones do
            collate, rows, val = PackedCollate(TurnsCollate(max_length)), packed(train, max_length), [[e] for e in val]
        if accelerator.is_main_process:
            for line in screening.lines():
                tqdm.write(line, file=sys.stderr)
            tqdm.write(
                f"training on {trained:,} target tokens of {len(train):,} conversations ({masked:,} masked)"
                + (f", packed in {len(rows):,} rows" if config.data.packing else ""),
                file=sys.stderr,
            )
        meta = {"max_length": max_length, **model_interface(config)}
        sample = sample_reply(data.splits["val"][0], config, quiet)
        return Setup(rows, val, collate, NextTokenTask(), meta, on_evaluate=sample)

    def evaluate(
        self,
        config: ChatConfig,
        data: Conversations,
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        """Loss and perplexity on each split (the conversations that fit)."""
        batch_size = config.train.eval_batch_size or config.train.batch_size
        collate = TurnsCollate(meta["max_length"])
        examples = {s: (encoded(data.splits[s], config, meta["max_length"], Screening(False)), collate) for s in splits}
        return evaluate_splits(NextTokenTask(), model, examples, batch_size, accelerator)

    def report(
        self,
        out: Path,
        config: ChatConfig,
        data: Conversations,
        metrics: dict,
        history: list[dict],
        model,
        quiet: bool,
    ) -> tuple[dict, list[str]]:
        """The last assistant turn of each test conversation answered and scored; curves.png."""
        rows = test_replies(model, data.splits["test"], config, out / "responses.jsonl")
        metrics["responses"] = {
            k: v
            for k, v in reference_metrics([r["response"] for r in rows], [r["output"] for r in rows]).items()
            if k != "per_example"
        }
        plot_curves(history, out / "curves.png", seen="tokens")
        return metrics, ["responses.jsonl", "curves.png"]

    def summary_table(self, metrics: dict) -> str:
        return summary_table(metrics)

    def report_body(self, config: ChatConfig, metrics: dict, out: Path) -> list[str]:
        lines = ["", "## Sample conversations", ""]
        with open(out / "responses.jsonl", encoding="utf-8") as f:
            for line in list(f)[:3]:
                row = json.loads(line)
                lines += [f"**{m['role']}:** {message_text(m)}  " for m in row["messages"]]
                lines += [f"**reference:** {row['output']}  ", f"**model:** {row['response']}", "", "---", ""]
        return lines


RECIPE = Chat()


def model_interface(config: ChatConfig) -> dict:
    """What a model trained by this config is: talking in its chat format, stopping at its end marker."""
    style = config.data.chat_format
    stop = [*config.generation.stop, *(s for s in stop_strings(style) if s not in config.generation.stop)]
    return interface_meta(style, config.generation.model_copy(update={"stop": stop}), config.train.seed)


def generation(config: ChatConfig) -> Generation:
    return Generation(**model_interface(config)["generation"])


def sample_reply(sample: Conversation, config: ChatConfig, quiet: bool):
    def show_sample(model) -> dict:
        """The reply to the first validation conversation's last question: printed, and logged."""
        answer = reply(model, [sample.messages[:-1]], config.data.chat_format, generation(config))[0]
        if not quiet:
            tqdm.write(f"sample reply: {answer!r}", file=sys.stderr)
        return {"sample": answer}

    return show_sample


def test_replies(model, conversations: list[Conversation], config: ChatConfig, path: Path) -> list[dict]:
    """responses.jsonl: each test conversation (that fits the context) up to its last question, the reference
    and the model's reply."""
    kept = [c for c, _ in fitting(conversations, config, model.config.context_length, Screening(False))]
    return write_replies(
        model,
        [c.messages[:-1] for c in kept],
        [message_text(c.messages[-1]) for c in kept],
        config.data.chat_format,
        generation(config),
        config.generation.batch_size,
        path,
        quiet=False,
    )
