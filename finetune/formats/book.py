"""The book's `GPTModel` layout (chapters 4-7): its state-dict names against ours, and its shapes.

A `.pth` saved by the book's code (`torch.save(model.state_dict())`, or its training checkpoints)
is read by `finetune.formats.loading`; this module only maps names and reads the architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.model.gpt import PRESETS, GPTConfig

# Per-block names: ours -> the book's GPTModel (q/k/v are separate Linear layers there).
_BOOK_BLOCK = {
    "ln_1.weight": "norm1.scale",
    "ln_1.bias": "norm1.shift",
    "attn.proj.weight": "att.out_proj.weight",
    "attn.proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.scale",
    "ln_2.bias": "norm2.shift",
    "mlp.fc.weight": "ff.layers.0.weight",
    "mlp.fc.bias": "ff.layers.0.bias",
    "mlp.proj.weight": "ff.layers.2.weight",
    "mlp.proj.bias": "ff.layers.2.bias",
}
_BOOK_QKV = ("att.W_query", "att.W_key", "att.W_value")
_BOOK_TOP = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.scale",
    "ln_f.bias": "final_norm.shift",
    "lm_head.weight": "out_head.weight",
}


def from_book(state: dict[str, torch.Tensor], C: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The book's tensors in our names; its separate q/k/v layers joined into one qkv."""
    top = {book: ours for ours, book in _BOOK_TOP.items()}
    block = {book: ours for ours, book in _BOOK_BLOCK.items()}
    block_key = re.compile(r"trf_blocks\.(\d+)\.(.+)")
    qkv_parts = {f"{p}.{kind}" for p in _BOOK_QKV for kind in ("weight", "bias")}
    layers = set()
    for name, t in state.items():
        m = block_key.fullmatch(name)
        if name in top:
            yield top[name], t
        elif m and m.group(2) in block:
            yield f"blocks.{m.group(1)}.{block[m.group(2)]}", t
        elif m and m.group(2) in qkv_parts:
            layers.add(m.group(1))
        elif m and m.group(2) == "att.mask":
            continue  # the causal-mask buffer
        else:
            yield name, t
    for i in sorted(layers, key=int):
        p = f"trf_blocks.{i}."
        yield f"blocks.{i}.attn.qkv.weight", torch.cat([state[p + q + ".weight"] for q in _BOOK_QKV])
        # The book's qkv_bias=False models have no q/k/v biases: zeros compute the same thing.
        bias = [state.get(p + q + ".bias", torch.zeros(C, dtype=state[p + q + ".weight"].dtype)) for q in _BOOK_QKV]
        yield f"blocks.{i}.attn.qkv.bias", torch.cat(bias)


def book_config(state: dict[str, torch.Tensor], path: Path) -> GPTConfig:
    """The preset shape a book state dict has (head counts cannot be read from shapes)."""
    try:
        vocab, C = state["tok_emb.weight"].shape
        context = state["pos_emb.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{path}: not a book GPTModel state dict (missing {e})") from e
    n_layer = len({k.split(".")[1] for k in state if k.startswith("trf_blocks.")})
    tied = "out_head.weight" in state and torch.equal(state["out_head.weight"], state["tok_emb.weight"])
    for preset in PRESETS.values():
        candidate = GPTConfig(**{**preset, "tie_embeddings": tied})
        if (candidate.n_embd, candidate.n_layer) == (C, n_layer):
            return GPTConfig(**{**candidate.to_dict(), "vocab_size": vocab, "context_length": context})
    raise UserError(
        f"{path}: shapes (n_embd={C}, n_layer={n_layer}) match no preset, so the head count is unknown; "
        "pass config=GPTConfig(...) to load_pretrained"
    )
