"""GPT-2 in the Hugging Face transformers layout, both ways: parameter names (Conv1D weights stored
transposed), `config.json`, and the tokenizer files.

Reading turns a transformers checkpoint into our names (`finetune.formats.loading`); writing turns our model
into a directory `GPT2LMHeadModel` / `GPT2ForSequenceClassification.from_pretrained` loads
(`finetune.formats.export`), and names the modules a PEFT adapter refers to (`finetune.formats.peft`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.model.gpt import GPTConfig
from finetune.model.tokenizer import ASSETS, EOT, EOT_ID

# Per-block parameter names: ours -> (transformers' name, stored transposed as Conv1D).
BLOCK = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
TOP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
# Our LoRA-able layers -> transformers' Conv1D modules of a block.
LINEAR = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_BLOCK_KEY = re.compile(r"h\.(\d+)\.(.+)")
_OUR_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def from_hf(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers GPT-2 state dict (with or without the `transformer.` prefix) in our names."""
    to_ours = {hf: (ours, transposed) for ours, (hf, transposed) in BLOCK.items()}
    top = {hf: ours for ours, hf in TOP.items()}
    for name, t in tensors:
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight":
            yield name, t
        elif name in top:
            yield top[name], t
        elif (m := _BLOCK_KEY.fullmatch(name)) and m.group(2) in to_ours:
            ours, transposed = to_ours[m.group(2)]
            yield f"blocks.{m.group(1)}.{ours}", t.t() if transposed else t
        elif m and m.group(2) in ("attn.bias", "attn.masked_bias"):
            continue  # causal-mask buffers of older checkpoints, not parameters
        else:
            yield name, t  # reported as unexpected


def hf_name(ours: str) -> tuple[str, bool]:
    """transformers' full name of one of our trunk parameters, and whether it is stored transposed."""
    if ours == "lm_head.weight":
        return ours, False
    if ours in TOP:
        return f"transformer.{TOP[ours]}", False
    m = _OUR_BLOCK_KEY.fullmatch(ours)
    if m is None or m.group(2) not in BLOCK:
        raise UserError(f"parameter {ours!r} has no GPT-2 counterpart in transformers")
    name, transposed = BLOCK[m.group(2)]
    return f"transformer.h.{m.group(1)}.{name}", transposed


def hf_module(ours: str) -> str:
    """transformers' name of one of our trunk modules (`blocks.3.attn.qkv` -> `transformer.h.3.attn.c_attn`)."""
    if ours in ("wte", "wpe", "ln_f"):
        return f"transformer.{ours}"
    if ours == "lm_head":
        return ours
    m = _OUR_BLOCK_KEY.fullmatch(ours)
    if m and m.group(2) in LINEAR:
        return f"transformer.h.{m.group(1)}.{LINEAR[m.group(2)]}"
    if m and m.group(2) in ("ln_1", "ln_2", "attn", "mlp"):
        return f"transformer.h.{m.group(1)}.{m.group(2)}"
    if re.fullmatch(r"blocks\.(\d+)", ours):
        return f"transformer.h.{ours.split('.')[1]}"
    raise UserError(f"module {ours!r} has no GPT-2 counterpart in transformers")


def our_module(hf: str) -> str:
    """The inverse of `hf_module`."""
    name = hf.removeprefix("transformer.")
    if name in ("wte", "wpe", "ln_f", "lm_head"):
        return name
    m = _BLOCK_KEY.fullmatch(name) or re.fullmatch(r"h\.(\d+)()", name)
    linear = {v: k for k, v in LINEAR.items()}
    if m and (m.group(2) in linear or m.group(2) in ("ln_1", "ln_2", "attn", "mlp", "")):
        rest = linear.get(m.group(2), m.group(2))
        return f"blocks.{m.group(1)}" + (f".{rest}" if rest else "")
    raise UserError(f"module {hf!r} is not a GPT-2 module this toolkit has")


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trunk's state dict in transformers' names and orientation (contiguous, for safetensors)."""
    out = {}
    for ours, t in state.items():
        name, transposed = hf_name(ours)
        out[name] = (t.t() if transposed else t).contiguous()
    return out


def read_hf_config(raw: dict, where: Path) -> GPTConfig:
    """Our config from a transformers GPT-2 `config.json`, refusing variants our model does not compute."""
    if raw.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type '{raw.get('model_type')}' is not gpt2")
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function '{raw['activation_function']}' is not GPT-2's tanh GELU")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if raw.get(flag):
            raise UserError(f"{where}: {flag}=true is not supported")
    try:
        return GPTConfig(
            vocab_size=raw.get("vocab_size", 50257),
            context_length=raw.get("n_positions", raw.get("n_ctx", 1024)),
            n_embd=raw.get("n_embd", 768),
            n_layer=raw.get("n_layer", 12),
            n_head=raw.get("n_head", 12),
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=raw.get("tie_word_embeddings", True),
        )
    except TypeError as e:
        raise UserError(f"{where}: bad GPT-2 config ({e})") from e


def hf_config(config: GPTConfig, architecture: str, **extra) -> dict:
    """transformers' `config.json` for our shape. Dropout is GPT-2's 0.1: it only acts in training
    mode, where a user fine-tuning further expects GPT-2's own setting."""
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
        **extra,
    }


def tokenizer_files(
    model_max_length: int, pad: bool, truncation_side: str = "right", extra: dict | None = None
) -> dict[str, Callable[[Path], object]]:
    """Writers of GPT-2's tokenizer as transformers reads it: the bundled BPE files are byte for byte
    its `vocab.json` and `merges.txt`; `<|endoftext|>` is the only special token (and the padding
    token of a classifier, which transformers needs to batch). `extra`: more tokenizer_config.json
    entries (a chat template)."""
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, **({"pad_token": EOT} if pad else {})}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "padding_side": "right",
        "truncation_side": truncation_side,
        "clean_up_tokenization_spaces": False,
        **special,
        **(extra or {}),
    }
    return {
        "vocab.json": lambda path: shutil.copyfile(ASSETS / "encoder.json", path),
        "merges.txt": lambda path: shutil.copyfile(ASSETS / "vocab.bpe", path),
        "tokenizer_config.json": lambda path: path.write_text(json.dumps(config, indent=2)),
        "special_tokens_map.json": lambda path: path.write_text(json.dumps(special, indent=2)),
    }
