"""Conversations from a user's file, checked as OpenAI checks a fine-tuning upload, and encoded for training.

Three shapes are read, record by record: OpenAI's fine-tuning format and Hugging Face `messages` datasets
(`{"messages": [{"role", "content", "weight"?}]}`) and ShareGPT (`{"conversations": [{"from", "value"}]}`,
`human`/`gpt` read as user/assistant), from JSONL, a JSON list or Parquet. A record that cannot be trained on is
one of the `PROBLEMS`; each kind is counted and reported in one line (or, strictly, refuses the run).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.jinja_templates import CannotExpress, Message, assistant_spans
from finetune.data.prompts import chat_template
from finetune.data.tables import read_table
from finetune.errors import UserError
from finetune.model.tokenizer import encode, get_tokenizer

FIELDS = ("messages", "conversations")  # OpenAI / Hugging Face, ShareGPT
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
PROBLEMS = {
    "malformed": "not a list of message objects",
    "role": "a message with a role other than system, user or assistant (ShareGPT: system, human, gpt)",
    "content": "a message with empty content or content that is not text",
    "weight": "an assistant message whose weight is not 0 or 1",
    "order": "roles that do not alternate user, assistant, ... after an optional first system message",
    "no_assistant": "no assistant message to train on",
    "ends_with_user": "a last message that is not the assistant's",
    "template": "a conversation the chat template refuses",
    "too_long": "more tokens than data.max_length",
}


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]  # {"role", "content"[, "weight"]}, roles system/user/assistant
    where: str  # file:line (or file: record N), for messages about it


class Screening:
    """What a file held: the conversations kept, and each problem's count and first record."""

    def __init__(self, strict: bool, setting: str = "data.path") -> None:
        self.strict, self.setting = strict, setting
        self.kept: list[Conversation] = []
        self.counts: Counter[str] = Counter()
        self.first: dict[str, tuple[str, str]] = {}

    def refuse(self, kind: str, where: str, detail: str = "") -> None:
        """Count a bad record, or (strictly) stop the run at it."""
        reason = PROBLEMS[kind] + (f" ({detail})" if detail else "")
        if self.strict:
            skip = ", or set data.strict=false to skip such records" if self.setting == "data.path" else ""
            raise UserError(f"{where}: {reason}; fix the record{skip}")
        self.counts[kind] += 1
        self.first.setdefault(kind, (where, detail))

    def lines(self) -> list[str]:
        """One line per kind of bad record: how many were skipped, and the first."""
        return [
            f"skipped {n:,} conversation(s) with {PROBLEMS[kind]}, e.g. {self.first[kind][0]}"
            + (f" ({self.first[kind][1]})" if self.first[kind][1] else "")
            for kind, n in self.counts.most_common()
        ]


def holds_conversations(path: Path, fmt: str | None = None) -> bool:
    """Whether a file's records are conversations (a `messages` or `conversations` column)."""
    return any(field in read_table(path, fmt).frame.columns for field in FIELDS)


def read_conversations(
    path: Path, fmt: str | None, field: str | None, strict: bool, to_answer: bool = False, setting: str = "data.path"
) -> Screening:
    """The conversations of a file, screened; `field` names the column of messages (null: the one present).
    `to_answer`: conversations to reply to, which may end with the user's message and hold no assistant one."""
    table = read_table(path, fmt, setting=setting)
    columns = list(map(str, table.frame.columns))
    name = field or next((f for f in FIELDS if f in columns), None)
    if name is None or name not in columns:
        raise UserError(
            f"{table.name}: no '{field or 'messages'}' column of conversations (columns: {', '.join(columns)}); "
            "records need 'messages' (OpenAI, Hugging Face) or 'conversations' (ShareGPT), or set data.messages_field"
        )
    screening = Screening(strict, setting)
    for i, value in enumerate(table.frame[name].tolist()):
        messages = _messages(_plain(value), to_answer)
        if isinstance(messages, Problem):
            screening.refuse(messages.kind, table.where(i), messages.detail)
        else:
            screening.kept.append(Conversation(messages, table.where(i)))
    return screening


def _plain(value: Any) -> Any:
    """Parquet's arrays and missing values as JSON's lists and None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEMS
    detail: str = ""


def _messages(value: Any, to_answer: bool = False) -> list[Message] | Problem:
    """The record's messages in OpenAI's shape, or why it cannot be trained on."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return Problem("malformed")
    messages = []
    for number, m in enumerate(value, start=1):
        role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
        if ROLES.get(role) is None:
            return Problem("role", f"message {number}: {role!r}")
        if not _is_text(content):
            return Problem("content", f"message {number}")
        message: Message = {"role": ROLES[role], "content": content}
        if "weight" in m and ROLES[role] == "assistant":
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return Problem("weight", f"message {number}: {m['weight']!r}")
            message["weight"] = int(m["weight"])
        messages.append(message)
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(turns)):
        return Problem("order", " ".join(roles))
    if to_answer:
        return messages if turns else Problem("order", "no user message")
    if "assistant" not in turns:
        return Problem("no_assistant")
    if turns[-1] != "assistant":
        return Problem("ends_with_user")
    return messages


def message_text(message: Message) -> str:
    """A message's text: its content, or its text parts one after another."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p.get("type") == "text")


def _is_text(content: Any) -> bool:
    """A non-blank string, or text parts (OpenAI's `[{"type": "text", "text": ...}]`) with some text."""
    if isinstance(content, str):
        return bool(content.strip())
    if not isinstance(content, list) or not content:
        return False
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return False
    return any(p["text"].strip() for p in content)


@dataclass
class ConversationTokens:
    """A conversation's tokens as the chat template renders them, and which tokens are trained on."""

    ids: list[int]
    trained: list[bool]  # per token: a target when it is predicted

    @property
    def length(self) -> int:
        """Positions a training row needs (the last token is only predicted)."""
        return len(self.ids) - 1


def encode_conversation(style: str, messages: list[Message], train_on: str = "assistant") -> ConversationTokens:
    """The rendered conversation tokenized whole (as `apply_chat_template` tokenizes it), each token trained on
    when it starts inside a chosen assistant turn (content and end marker): every turn whose weight is not 0
    (`assistant`), the last one (`last`), or every token (`all`). CannotExpress when the template refuses it."""
    text, spans = assistant_spans(chat_template(style), messages)
    if train_on == "last":
        spans = spans[-1:]
    elif train_on == "assistant":
        spans = [s for s in spans if messages[s[2]].get("weight", 1) != 0]
    ids = encode(text)
    starts = _token_starts(ids)
    if train_on == "all":
        return ConversationTokens(ids, [True] * len(ids))
    return ConversationTokens(ids, [any(start <= s < end for start, end, _ in spans) for s in starts])


def _token_starts(ids: list[int]) -> list[int]:
    """The character offset at which each token's text starts."""
    _, starts = get_tokenizer().decode_with_offsets(ids)
    return starts


def encode_screened(
    conversations: list[Conversation], style: str, train_on: str, max_length: int, screening: Screening
) -> list[tuple[Conversation, ConversationTokens]]:
    """The conversations encoded; those the template refuses or longer than `max_length` counted in `screening`."""
    out = []
    for conversation in conversations:
        try:
            encoded = encode_conversation(style, conversation.messages, train_on)
        except CannotExpress as e:
            screening.refuse("template", conversation.where, str(e))
            continue
        if encoded.length > max_length:
            screening.refuse("too_long", conversation.where, f"{encoded.length:,} > {max_length:,}")
            continue
        out.append((conversation, encoded))
    return out
