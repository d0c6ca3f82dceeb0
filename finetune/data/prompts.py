"""Prompt styles: how an instruction (and its optional input), or a whole conversation, becomes the text a
model continues.

A style is named in a run's config (`data.prompt_style`, or a chat run's `data.chat_format`) and stored with
every checkpoint and export, so a model is always prompted the way it was trained:

- `alpaca`: the book's chapter 7 template (preamble, `### Instruction:`, `### Input:`, `### Response:`); in a
  conversation a system message takes the preamble's place and turns repeat as Instruction/Response blocks;
- `phi3`: the book's exercise 7.1 (`<|user|>` ... `<|assistant|>:`), with `<|system|>` for a system message;
- `chatml`: `<|im_start|>role` ... `<|im_end|>` around every message;
- `plain`: the instruction as it is (and the input on the next line), for models trained on raw text;
- a template of your own holding `{instruction}` and, optionally, `{input}` (one turn, no system message);
- a Jinja chat template of your own, as transformers reads them (any number of turns).

Every marker is plain text that GPT-2's tokenizer splits into pieces it already knows: GPT-2 has no chat
tokens, and new ones would start untrained, grow the vocabulary every runtime and every LoRA base must then
match, and stay untrainable for a LoRA run. An alpaca or phi3 assistant turn ends with `<|endoftext|>`, the one
special token GPT-2 has and every runtime stops at; a chatml turn ends with `<|im_end|>`, a stop string the model
carries in its generation settings (docs/recipes/chat.md).

The same style is written as a Jinja `chat_template` for transformers, vLLM, TGI and llama.cpp: a user
message is the instruction, or two text parts, the instruction and its input (OpenAI's content parts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune.data.jinja_templates import CannotExpress, Message, compiled, render
from finetune.errors import UserError
from finetune.model.tokenizer import EOT

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
NAMED = ("alpaca", "phi3", "chatml", "plain")


@dataclass(frozen=True)
class Turns:
    """How a style writes a conversation: a system message between `system_before` and `system_after`
    (`default_system` when there is none); each user turn between `user_before` and `user_after`, preceded by
    `between` from the second turn on; each assistant turn after `assistant_before` and followed by `end`."""

    system_before: str
    system_after: str
    user_before: str
    user_after: str
    assistant_before: str
    end: str
    between: str
    default_system: str | None = None
    stop: tuple[str, ...] = ()  # where a reply ends besides end-of-text: a text end marker


@dataclass(frozen=True)
class Template:
    """A style as three pieces: text before the instruction, before the input (only when there is one),
    and before the response; and, for a style that can hold a conversation, how it writes one."""

    head: str
    before_input: str
    before_response: str
    input_optional: bool = True  # False: a user's template with {input} keeps its text around an empty input
    turns: Turns | None = None  # None: one user message, no system message


def _conversational(turns: Turns, before_input: str) -> Template:
    system = turns.system_before + turns.default_system + turns.system_after if turns.default_system else ""
    return Template(system + turns.user_before, before_input, turns.user_after + turns.assistant_before, turns=turns)


_STYLES = {
    "alpaca": _conversational(
        Turns("", "\n\n", "### Instruction:\n", "", "\n\n### Response:\n", EOT, "\n\n", ALPACA_PREAMBLE),
        "\n\n### Input:\n",
    ),
    "phi3": _conversational(Turns("<|system|>\n", "\n", "<|user|>\n", "", "\n<|assistant|>:\n", EOT, "\n"), "\n"),
    "chatml": _conversational(
        Turns(
            "<|im_start|>system\n",
            "<|im_end|>\n",
            "<|im_start|>user\n",
            "<|im_end|>\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            "",
            stop=("<|im_end|>",),
        ),
        "\n\n",
    ),
    "plain": Template("", "\n", ""),
}


def is_jinja(style: str) -> bool:
    """A Jinja chat template (it loops over `messages`), not a `{instruction}` template."""
    return "messages" in style and ("{%" in style or "{{" in style)


def check_style(style: str, setting: str = "data.prompt_style") -> str:
    """`style` if it is a named style, a usable template or a Jinja chat template that renders a question;
    else a one-line error naming `setting`."""
    if is_jinja(style):
        try:
            compiled(style)
            render(style, [{"role": "user", "content": "Hi."}], add_generation_prompt=True)
        except CannotExpress as e:
            raise UserError(f"{setting}: the Jinja chat template cannot render one user message: {e}") from None
    else:
        template(style, setting)
    return style


def check_single_turn_style(style: str, setting: str = "data.prompt_style") -> str:
    """`style` for a recipe that trains one response ended by end-of-text (instruct, DPO, GRPO, reward models):
    a style whose replies end there; chatml and Jinja templates end turns with markers of their own."""
    check_style(style, setting)
    if is_jinja(style) or stop_strings(style):
        name = "a Jinja chat template" if is_jinja(style) else f"'{style}'"
        raise UserError(
            f"{setting}: {name} ends each reply with its own marker; train it with the chat recipe (finetune run "
            "chat), or use alpaca, phi3, plain or an {instruction} template"
        )
    return style


def template(style: str, setting: str = "data.prompt_style") -> Template:
    """The pieces of a named style or an `{instruction}` template (a Jinja template has none)."""
    if style in _STYLES:
        return _STYLES[style]
    if "{instruction}" not in style:
        raise UserError(
            f"{setting}: '{style}' is not a prompt style ({', '.join(NAMED)}), a template with an "
            "{instruction} placeholder (and optionally {input}), nor a Jinja chat template over `messages`"
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


def user_message(instruction: str, input: str = "") -> Message:
    """An instruction as a user message: its text, or two text parts when it has an input."""
    if not input:
        return {"role": "user", "content": instruction}
    return {"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "text", "text": input}]}


def format_prompt(style: str, instruction: str, input: str = "") -> str:
    """The text the model continues with its response."""
    if is_jinja(style):
        return render(style, [user_message(instruction, input)], add_generation_prompt=True)
    t = template(style)
    if input or not t.input_optional:
        return t.head + instruction + t.before_input + input + t.before_response
    return t.head + instruction + t.before_response


def format_exchange(style: str, instruction: str, input: str, response: str) -> str:
    """A prompt and its response as one text: what a reward model reads (in training and in use alike)."""
    return format_prompt(style, instruction, input) + response


def format_conversation(style: str, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The conversation as the model reads it; CannotExpress when the style cannot hold it."""
    return render(chat_template(style), messages, add_generation_prompt)


def stop_strings(style: str | None) -> list[str]:
    """Where the style's replies end besides end-of-text (chatml's `<|im_end|>`)."""
    turns = None if style is None or is_jinja(style) else template(style).turns
    return list(turns.stop) if turns else []


def can_converse(style: str) -> bool:
    """Whether the style holds a system message and many turns (a Jinja template is taken to)."""
    return is_jinja(style) or template(style).turns is not None


_USER_PARTS = (
    "{%- if message.content is string %}{%- set instruction = message.content %}{%- set input = '' %}"
    "{%- else %}{%- set parts = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| list %}{%- set instruction = parts[0] %}{%- set input = parts[1] if parts | length > 1 else '' %}{%- endif %}"
)
_TEXT = "(c if c is string else (c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')))"


def chat_template(style: str) -> str:
    """The style as a Jinja chat template (transformers' `apply_chat_template`, vLLM, TGI, llama.cpp). A style
    with turns renders every message (a first system message, then user and assistant turns by turns), one
    without refuses all but a single user message; with `add_generation_prompt`, a single user message renders
    as `format_prompt` does."""
    if is_jinja(style):
        return style
    t = template(style)
    if t.turns is None:
        return _one_turn_template(t)
    turns = t.turns
    input_part = f"{{%- if input %}}{_literal(t.before_input)}{{{{ input }}}}{{%- endif %}}"
    system = json.dumps(turns.default_system) if turns.default_system else "none"
    return (
        f"{{%- set turns = messages %}}{{%- set system = {system} %}}"
        "{%- if messages and messages[0].role == 'system' %}{%- set c = messages[0].content %}"
        f"{{%- set system = {_TEXT} %}}{{%- set turns = messages[1:] %}}{{%- endif %}}"
        f"{{%- if system is not none %}}{_literal(turns.system_before)}{{{{ system }}}}{_literal(turns.system_after)}"
        "{%- endif %}"
        "{%- for message in turns %}"
        "{%- if message.role == 'user' and loop.index0 % 2 == 0 %}"
        f"{{%- if not loop.first %}}{_literal(turns.between)}{{%- endif %}}{_USER_PARTS}"
        f"{_literal(turns.user_before)}{{{{ instruction }}}}{input_part}{_literal(turns.user_after)}"
        "{%- elif message.role == 'assistant' and loop.index0 % 2 == 1 %}{%- set c = message.content %}"
        f"{_literal(turns.assistant_before)}{{{{ {_TEXT} }}}}{_literal(turns.end)}"
        "{%- else %}{{ raise_exception('roles must alternate user, assistant, user, ... after an optional first "
        "system message; got ' ~ message.role ~ ' as message ' ~ loop.index) }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and turns and turns[-1].role == 'user' %}"
        f"{_literal(turns.assistant_before)}{{%- endif %}}"
    )


def _one_turn_template(t: Template) -> str:
    """A style without turns: one user message, in the style."""
    input_part = (
        f"{_literal(t.before_input)}{{{{ input }}}}"
        if not t.input_optional
        else f"{{%- if input %}}{_literal(t.before_input)}{{{{ input }}}}{{%- endif %}}"
    )
    return (
        "{%- if messages | length != 1 or messages[0].role != 'user' %}"
        "{{ raise_exception('this prompt style holds one user message (no system message, no earlier turns)') }}"
        "{%- endif %}{%- set message = messages[0] %}"
        f"{_USER_PARTS}{_literal(t.head)}{{{{ instruction }}}}{input_part}"
        f"{{%- if add_generation_prompt %}}{_literal(t.before_response)}{{%- endif %}}"
    )


def _literal(text: str) -> str:
    """Text as a Jinja string expression (escapes decoded as Python's), immune to whitespace control."""
    return f"{{{{ {json.dumps(text)} }}}}" if text else ""


def split_user_text(text: str) -> tuple[str, str]:
    """`instruction || input` (what `finetune chat` reads) as (instruction, input)."""
    instruction, _, extra = text.partition("||")
    return instruction.strip(), extra.strip()
