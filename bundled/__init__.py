"""Datasets shipped with finetune, so the recipes and presets run offline (installed as `finetune.datasets`).

Each file is read through the package (`importlib.resources`), never through a path into a source
checkout, and checked against the SHA-256 of the published file before use. Sources and licenses:
`bundled/README.md`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from finetune.errors import UserError


@dataclass(frozen=True)
class BundledFile:
    relative: str  # path inside this package
    sha256: str
    url: str  # where to get the published file again
    title: str  # how messages name it (not by its path inside site-packages)


SMS_SPAM = BundledFile(
    "sms-spam-collection/SMSSpamCollection",
    "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "the bundled SMS Spam Collection",
)
INSTRUCTIONS = BundledFile(
    "instruction-data/instruction-data.json",
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
    "the bundled instruction data",
)
THE_VERDICT = BundledFile(
    "the-verdict/the-verdict.txt",
    "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
    "the bundled The Verdict",
)
PREFERENCES = BundledFile(
    "instruction-data-with-preference/instruction-data-with-preference.json",
    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
    "the bundled preference data",
)

ARITHMETIC = BundledFile(
    "arithmetic/arithmetic.jsonl",
    "56ad909812879d2e453135a65d27663afffdfe2d6fcc118ad0c0f7ea4107a2de",
    "make_arithmetic.py beside it (which rewrites it byte for byte)",
    "the bundled arithmetic questions",
)
SMS_TAGS = BundledFile(
    "sms-tags/sms-tags.jsonl",
    "5e8053e0a1739a1a387de45f31cf3a2fc399f9f7896154227572792e28aaae49",
    "make_sms_tags.py beside it (which rewrites it byte for byte from the SMS Spam Collection)",
    "the bundled SMS tags",
)
CONVERSATIONS = BundledFile(
    "conversations/conversations.jsonl",
    "a4bca3beb5901f7106a6bc132c19364f0a3414eb9e058c383f0dfc0d43f81248",
    "make_conversations.py beside it (which rewrites it byte for byte from the bundled instruction data)",
    "the bundled conversations",
)
CONVERSATIONS_SHAREGPT = BundledFile(
    "conversations/conversations-sharegpt.json",
    "10c230dfcf547d17d77ccaca50e06179f5b022ed96100bfb8d2ffd7a44f89885",
    "make_conversations.py beside it (which rewrites it byte for byte from the bundled instruction data)",
    "the bundled conversations (ShareGPT)",
)
NAMED = {
    "instructions": INSTRUCTIONS,
    "preferences": PREFERENCES,
    "arithmetic": ARITHMETIC,
    "sms-tags": SMS_TAGS,
    "conversations": CONVERSATIONS,
    "conversations-sharegpt": CONVERSATIONS_SHAREGPT,
}
PREFIX = "bundled:"


def data_file(path: str | None, default: BundledFile, setting: str = "data.path") -> Path:
    """A recipe's data file: `path` as given, `bundled:NAME` for a file shipped here (a preset names
    one so), or the recipe's `default` when `path` is null."""
    if path is None:
        return bundled(default)
    if path.startswith(PREFIX):
        name = path.removeprefix(PREFIX)
        if name not in NAMED:
            raise UserError(f"{setting}: no bundled data named '{name}'; choose one of {', '.join(NAMED)}")
        return bundled(NAMED[name])
    return Path(path)


def bundled(file: BundledFile) -> Path:
    """The installed copy of `file`, after checking it is the published one."""
    path = Path(str(resources.files(__name__).joinpath(file.relative)))
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(
            f"bundled data file {path} is missing or unreadable ({e.strerror}); "
            f"reinstall finetune-gpt2 or restore it from {file.url}"
        ) from e
    if digest != file.sha256:
        raise UserError(
            f"bundled data file {path}: checksum mismatch (altered or damaged); "
            f"reinstall finetune-gpt2 or restore it from {file.url}"
        )
    return path
