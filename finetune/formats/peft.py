"""PEFT's LoRA adapter files (`adapter_config.json` + `adapter_model.safetensors`), read and written.

PEFT is a file format here, not a dependency: an adapter trained with `peft` on a transformers GPT-2
loads into our own LoRA layers (`finetune.formats.loading`), and a LoRA run exports to files that
`peft.PeftModel.from_pretrained` loads (`finetune.formats.export`). Tensors are named as PEFT saves them,
`base_model.model.<transformers module>.lora_A.weight`, and modules trained whole beside the adapters
(`modules_to_save`, e.g. a classifier's `score`) as `base_model.model.<transformers parameter>`.
GPT-2's Conv1D layers make no difference to A and B: PEFT stores them as for a Linear layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.checkpoints.model_files import read_config, read_tensors
from finetune.errors import UserError
from finetune.formats.transformers import LINEAR, from_hf, hf_module, hf_name, our_module

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
TASK_TYPES = {"CAUSAL_LM": "lm", "SEQ_CLS": "classification"}
HEAD = "score"  # transformers' GPT2ForSequenceClassification head; ours is `head`
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
# Settings our LoRA layers do not compute; any value but these is refused, naming the field.
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "megatron_config",
    "arrow_config",
)


@dataclass
class PeftAdapter:
    """An adapter in our names: LoRA matrices by module (`blocks.0.attn.qkv`, `head`), and the tensors
    of modules trained whole by parameter (`ln_f.bias`, `head.weight`), both relative to the GPT trunk
    except the classifier's `head`."""

    base: str
    task: str  # "lm" or "classification"
    rank: int
    alpha: float
    dropout: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    saved: dict[str, torch.Tensor]


def is_peft_adapter(directory: Path) -> bool:
    """PEFT's files: an adapter_config.json with a peft_type, or adapter weights (whose config
    `read_adapter` then insists on)."""
    directory = Path(directory)
    if (directory / PEFT_WEIGHTS).is_file() or (directory / PICKLED_WEIGHTS).is_file():
        return True
    return (directory / PEFT_CONFIG).is_file() and "peft_type" in read_config(directory, PEFT_CONFIG)


def read_adapter(directory: Path) -> PeftAdapter:
    """A PEFT LoRA adapter for GPT-2, or a one-line error naming the field or tensor we cannot honour."""
    directory = Path(directory)
    where = directory / PEFT_CONFIG
    config = read_config(directory, PEFT_CONFIG)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters load")
    task = TASK_TYPES.get(str(config.get("task_type")))
    if task is None:
        raise UserError(
            f"{where}: task_type {config.get('task_type')!r} is not supported; use one of {', '.join(TASK_TYPES)}"
        )
    for field in _UNSUPPORTED:
        if config.get(field) not in (None, False, {}, [], "none"):
            raise UserError(f"{where}: {field}={json.dumps(config[field])} is not supported by finetune's LoRA layers")
    if config.get("bias", "none") != "none":
        raise UserError(f"{where}: bias={config['bias']!r} is not supported; only bias='none' adapters load")
    try:
        rank, alpha, base = int(config["r"]), float(config["lora_alpha"]), str(config["base_model_name_or_path"])
        dropout = float(config.get("lora_dropout", 0.0))
    except KeyError as e:
        raise UserError(f"{where}: missing field {e}") from e
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad value ({e})") from e
    lora, saved = _split(_weights(directory), rank)
    if not lora:
        raise UserError(f"{directory / PEFT_WEIGHTS}: no LoRA tensors (lora_A / lora_B) found")
    return PeftAdapter(base, task, rank, alpha, dropout, lora, saved)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / PEFT_WEIGHTS
    if not path.is_file() and (directory / PICKLED_WEIGHTS).is_file():
        raise UserError(
            f"{directory / PICKLED_WEIGHTS}: pickled adapters are refused (loading one can run code); "
            "save the adapter with safe_serialization=True (adapter_model.safetensors)"
        )
    return {name.removeprefix(_PREFIX): t for name, t in read_tensors(path)}


def _split(tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict, dict]:
    """LoRA pairs by our module name, and the other (saved whole) tensors by our parameter name."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved = {}
    for key, t in tensors.items():
        if m := _LORA_KEY.fullmatch(key):
            pairs.setdefault(_lora_module(m.group(1), key), {})[m.group(2)] = t
        elif key.split(".")[0] == HEAD:
            saved[key.replace(HEAD, "head", 1)] = t
        else:
            ((name, tensor),) = from_hf([(key, t)])
            hf_name(name)  # a name from_hf did not recognise is refused here
            saved[name] = tensor
    lora = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{PEFT_WEIGHTS}: {module} has lora_{next(iter(pair))} without its pair")
        if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise UserError(
                f"{PEFT_WEIGHTS}: {module} has rank {pair['A'].shape[0]}, not r={rank} "
                "(per-layer ranks are not supported)"
            )
        lora[module] = (pair["A"], pair["B"])
    return lora, saved


def _lora_module(hf: str, key: str) -> str:
    if hf in (HEAD, "lm_head"):
        return "head" if hf == HEAD else hf
    module = our_module(hf) if hf.startswith(("transformer.h.", "h.")) else None
    if module is None or module.split(".", 2)[-1] not in LINEAR:
        raise UserError(
            f"{PEFT_WEIGHTS}: LoRA on {hf!r} ({key}) is not supported; "
            f"supported targets: {', '.join(LINEAR.values())}, {HEAD}, lm_head (when not tied)"
        )
    return module


def adapter_files(
    adapter: PeftAdapter, modules_to_save: list[str], n_layer: int
) -> dict[str, Callable[[Path], object]]:
    """Writers of a PEFT adapter directory for a GPT-2 of `n_layer` blocks; `modules_to_save` names the
    transformers modules saved whole."""
    targets = sorted(hf_module(m) if m != "head" else HEAD for m in adapter.lora)
    config = {
        "peft_type": "LORA",
        "task_type": {v: k for k, v in TASK_TYPES.items()}[adapter.task],
        "base_model_name_or_path": adapter.base,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": _compact(targets, n_layer),
        "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers store their weights transposed
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for module, (a, b) in adapter.lora.items():
        name = HEAD if module == "head" else hf_module(module)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for param, t in adapter.saved.items():
        if param.startswith("head."):
            name, transposed = param.replace("head", HEAD, 1), False
        else:
            name, transposed = hf_name(param)
        tensors[f"{_PREFIX}{name}"] = (t.t() if transposed else t).contiguous()
    return {
        PEFT_WEIGHTS: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        PEFT_CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
    }


def _compact(targets: list[str], n_layer: int) -> list[str]:
    """`attn.c_attn` rather than one name per block when every block has the layer."""
    in_blocks = {t for t in targets if t.startswith("transformer.h.")}
    kinds = sorted({t.split(".", 3)[3] for t in in_blocks})
    if in_blocks == {f"transformer.h.{i}.{k}" for i in range(n_layer) for k in kinds}:
        return kinds + [t for t in targets if t not in in_blocks]
    return targets
