"""GPT-2 itself: the model, its classifier head, LoRA layers, the chunked next-token loss and the tokenizer.
The lowest layer: it imports nothing else of the toolkit but `finetune.errors`.

`from finetune.model import GPT, GPTConfig` works as before the layers were folders; the names load on
first use, so that importing the tokenizer alone does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.model.gpt import GPT, PRESETS, GPTConfig, KVCache

__all__ = ["GPT", "PRESETS", "GPTConfig", "KVCache"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("finetune.model.gpt"), name)
    raise AttributeError(f"module 'finetune.model' has no attribute {name!r}")
