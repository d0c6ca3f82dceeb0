"""Prompt styles: how an instruction (and its optional input) becomes the text a model continues.

A style is named in a run's config (`data.prompt_style`) and stored with every checkpoint and export,
so a model is always prompted the way it was trained:

- `alpaca`: the book's chapter 7 template (preamble, `### Instruction:`, `### Input:`, `### Response:`);
- `phi3`: the book's exercise 7.1 (`<|user|>` ... `<|assistant|>:`), written as plain text, as GPT-2's
  tokenizer knows no such special tokens;
- `plain`: the instruction as it is (and the input on the next line), for models trained on raw text;
- a template of your own holding `{instruction}` and, optionally, `{input}`.

The same style is written as a Jinja `chat_template` for transformers, vLLM, TGI and llama.cpp: a user
message is the instruction, or two text parts, the instruction and its input (OpenAI's content parts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune.errors import UserError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
NAMED = ("alpaca", "phi3", "plain")


@dataclass(frozen=True)
class Template:
    """A style as three pieces: text before the instruction, before the input (only when there is one),
    and before the response."""

    head: str
    before_input: str
    before_response: str
    input_optional: bool = True  # False: a user's template with {input} keeps its text around an empty input


_STYLES = {
    "alpaca": Template(f"{ALPACA_PREAMBLE}\n\n### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"),
    "phi3": Template("<|user|>\n", "\n", "\n<|assistant|>:\n"),
    "plain": Template("", "\n", ""),
}


def check_style(style: str, setting: str = "data.prompt_style") -> str:
    """`style` if it is a named style or a usable template; else a one-line error naming `setting`."""
    template(style, setting)
    return style


def template(style: str, setting: str = "data.prompt_style") -> Template:
    if style in _STYLES:
        return _STYLES[style]
    if "{instruction}" not in style:
        raise UserError(
            f"{setting}: '{style}' is not a prompt style ({', '.join(NAMED)}) nor a template with an "
            "{instruction} placeholder (and optionally {input})"
        )
    if style.count("{instruction}") > 1 or style.count("{input}") > 1:
        raise UserError(f"{setting}: a template holds {{instruction}} once and {{input}} at most once")
    head, rest = style.split("{instruction}")
    if "{input}" in head:
        raise UserError(f"{setting}: {{input}} must come after {{instruction}} in the template")
    before_input, _, after_input = rest.partition("{input}")
    if not after_input and "{input}" not in rest:
        return Template(head, "\n", rest)  # no {input}: an input goes on the line after the instruction
    return Template(head, before_input, after_input, input_optional=False)


def format_prompt(style: str, instruction: str, input: str = "") -> str:
    """The text the model continues with its response."""
    t = template(style)
    if input or not t.input_optional:
        return t.head + instruction + t.before_input + input + t.before_response
    return t.head + instruction + t.before_response


def format_exchange(style: str, instruction: str, input: str, response: str) -> str:
    """A prompt and its response as one text: what a reward model reads (in training and in use alike)."""
    return format_prompt(style, instruction, input) + response


def chat_template(style: str) -> str:
    """The style as a Jinja chat template (transformers' `apply_chat_template`, vLLM, TGI, llama.cpp):
    the last user message, with `add_generation_prompt`, renders as `format_prompt` does."""
    t = template(style)
    input_part = (
        f"{_literal(t.before_input)}{{{{ input }}}}"
        if not t.input_optional
        else f"{{%- if input %}}{_literal(t.before_input)}{{{{ input }}}}{{%- endif %}}"
    )
    return (
        "{%- set message = (messages | selectattr('role', 'equalto', 'user') | list)[-1] %}"
        "{%- if message.content is string %}{%- set instruction = message.content %}{%- set input = '' %}"
        "{%- else %}{%- set parts = message.content | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | list %}"
        "{%- set instruction = parts[0] %}{%- set input = parts[1] if parts | length > 1 else '' %}{%- endif %}"
        f"{_literal(t.head)}{{{{ instruction }}}}{input_part}"
        f"{{%- if add_generation_prompt %}}{_literal(t.before_response)}{{%- endif %}}"
    )


def _literal(text: str) -> str:
    """Text as a Jinja string expression (escapes decoded as Python's), immune to whitespace control."""
    return f"{{{{ {json.dumps(text)} }}}}" if text else ""


def split_user_text(text: str) -> tuple[str, str]:
    """`instruction || input` (what `finetune chat` reads) as (instruction, input)."""
    instruction, _, extra = text.partition("||")
    return instruction.strip(), extra.strip()
