"""Jinja chat templates rendered as transformers renders them, and where each assistant turn lies in the text.

The environment is the one `apply_chat_template` uses (a sandbox, `trim_blocks`, `lstrip_blocks`, loop
controls, `raise_exception`, a `tojson` that keeps non-ASCII text), so a conversation rendered here is the text
transformers renders from the exported `chat_template`, and training sees what every runtime will be sent.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from finetune.errors import UserError
from finetune.model.tokenizer import EOT

Message = dict[str, Any]  # {"role": ..., "content": str or [{"type": "text", "text": ...}], "weight"?: 0 or 1}


class CannotExpress(UserError):
    """The template refuses a conversation (raise_exception) or fails on it: the message says why."""


def _raise(message: str) -> None:
    raise CannotExpress(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compiled(source: str) -> jinja2.Template:
    """`source` compiled once; a syntax error is a CannotExpress naming its line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CannotExpress(f"not a valid Jinja template (line {e.lineno}: {e.message})") from None


def render(source: str, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, with the generation prompt of the next assistant turn when asked."""
    try:
        return compiled(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=EOT, eos_token=EOT
        )
    except CannotExpress:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CannotExpress(f"the chat template failed on it ({type(e).__name__}: {e})") from None


def assistant_spans(source: str, messages: list[Message]) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and (start, end, message index) of each assistant turn in it.

    A turn is what rendering it adds after the conversation before it with its generation prompt: its content and
    the end marker the model must learn to write. A template whose earlier text changes as turns are added
    cannot be trained turn by turn, and is refused."""
    text = render(source, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(source, messages[:i], add_generation_prompt=True)
        through = render(source, messages[: i + 1])
        if not through.startswith(before) or not text.startswith(through):
            raise CannotExpress(
                f"the chat template renders turn {i + 1} differently once later turns follow; "
                "a template for training must render a conversation's beginning the same whatever comes after"
            )
        spans.append((len(before), len(through), i))
    return text, spans
