"""finetune: fine-tune GPT-2 with a readable model, recipes, hand-written LoRA and evals.

The names below are imported on first use, so that `finetune --help` and `--version` answer
without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.model import GPT, PRESETS, GPTConfig
    from finetune.weights import build_model, load_pretrained

_LAZY = {"GPT": "finetune.model", "GPTConfig": "finetune.model", "PRESETS": "finetune.model",
         "build_model": "finetune.weights", "load_pretrained": "finetune.weights"}
__all__ = ["GPT", "GPTConfig", "PRESETS", "UserError", "build_model", "load_pretrained"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
