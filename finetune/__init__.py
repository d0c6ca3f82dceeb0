"""finetune: fine-tune GPT-2 with a readable model, recipes, hand-written LoRA and evals.

The names below are imported on first use, so that `finetune --help` and `--version` answer
without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.formats.loading import build_model, load_pretrained
    from finetune.model.gpt import GPT, PRESETS, GPTConfig

_LAZY = {
    "GPT": "finetune.model.gpt",
    "GPTConfig": "finetune.model.gpt",
    "PRESETS": "finetune.model.gpt",
    "build_model": "finetune.formats.loading",
    "load_pretrained": "finetune.formats.loading",
}
__all__ = ["GPT", "GPTConfig", "PRESETS", "UserError", "build_model", "load_pretrained"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
