"""Responses of a language model to instructions, prompted in its style and answered with its
generation defaults: what `finetune respond` and `finetune chat` print and what instruction and
preference runs write for their test split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from finetune.checkpoints.atomic import write_text_atomic
from finetune.checkpoints.interface import Generation
from finetune.data.jinja_templates import Message
from finetune.data.prompts import format_conversation, format_prompt, stop_strings
from finetune.data.records import Record
from finetune.errors import UserError
from finetune.inference.generate import generate
from finetune.model.tokenizer import EOT_ID, encode, get_tokenizer
from finetune.progress import progress


def prompt_tokens(record: Record, style: str) -> list[int]:
    """The prompt as the model saw it in training: the style's text, with no special tokens."""
    return get_tokenizer().encode_ordinary(format_prompt(style, record.instruction, record.input))


def conversation_tokens(messages: list[Message], style: str) -> list[int]:
    """A conversation in the style, ending with the generation prompt of the assistant's next turn, tokenized
    whole (as transformers tokenizes `apply_chat_template`); CannotExpress when the style cannot hold it."""
    return encode(format_conversation(style, messages))


def respond(model, records: list[Record], style: str, generation: Generation) -> list[str]:
    """Responses to records, batched through the KV-cache generator, each ended at end-of-text or at
    the first stop string."""
    prompts = [prompt_tokens(r, style) for r in records]
    return answer(model, prompts, style, generation, [f"instruction {r.instruction[:40]!r}…" for r in records])


def reply(model, conversations: list[list[Message]], style: str, generation: Generation) -> list[str]:
    """The assistant's next turn in each conversation (the last message is the user's)."""
    prompts = [conversation_tokens(messages, style) for messages in conversations]
    names = [f"a conversation of {len(messages)} messages" for messages in conversations]
    return answer(model, prompts, style, generation, names)


def answer(model, prompts: list[list[int]], style: str, generation: Generation, names: list[str]) -> list[str]:
    """Texts generated after each prompt, ended at end-of-text or the first stop string (the model's and its
    style's end marker); `names` say which prompt is too long for the context."""
    tokenizer = get_tokenizer()
    context = model.config.context_length
    for name, prompt in zip(names, prompts, strict=True):
        if len(prompt) >= context:
            raise UserError(
                f"prompt of {len(prompt)} tokens does not fit the context of {context} ({name}); shorten it"
            )
    stop = [*generation.stop, *(s for s in stop_strings(style) if s not in generation.stop)]
    budget = min(generation.max_new_tokens, context - max(len(p) for p in prompts))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(generation.seed)
    out = generate(
        model,
        prompts,
        budget,
        generation.temperature,
        generation.top_k,
        generation.top_p,
        EOT_ID,
        generator,
        stop=stop,
    )
    texts = [tokenizer.decode([t for t in row[len(p) :] if t != EOT_ID]) for row, p in zip(out, prompts, strict=True)]
    return [cut_at_stop(text, stop).strip() for text in texts]


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string it holds."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def write_responses(
    model, records: list[Record], style: str, generation: Generation, batch_size: int, path: Path, quiet: bool = True
) -> list[dict]:
    """Responses to every record, in batches, written to `path` (JSON Lines) beside each reference, with the
    prompt style they were asked in (an LLM judge is shown the instruction as the model saw it)."""
    rows = []
    for start in progress(range(0, len(records), batch_size), "responding", quiet):
        batch = records[start : start + batch_size]
        for record, response in zip(batch, respond(model, batch, style, generation), strict=True):
            rows.append(
                {
                    "instruction": record.instruction,
                    "input": record.input,
                    "output": record.output,
                    "response": response,
                    "prompt_style": style,
                }
            )
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def with_max_new_tokens(generation: Generation, max_new_tokens: int | None) -> Generation:
    return generation if max_new_tokens is None else replace(generation, max_new_tokens=max_new_tokens)


def write_replies(
    model,
    conversations: list[list[Message]],
    references: list[str],
    style: str,
    generation: Generation,
    batch_size: int,
    path: Path,
    quiet: bool = True,
) -> list[dict]:
    """The assistant's next turn in every conversation (each ends with the user's message), in batches, written
    to `path` (JSON Lines) as `messages`, the reference `output` ("" for none), `response` and `prompt_style`."""
    rows = []
    for start in progress(range(0, len(conversations), batch_size), "replying", quiet):
        batch = conversations[start : start + batch_size]
        for messages, reference, answer in zip(
            batch, references[start : start + batch_size], reply(model, batch, style, generation), strict=True
        ):
            rows.append({"messages": messages, "output": reference, "response": answer, "prompt_style": style})
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
