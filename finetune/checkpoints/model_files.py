"""How a model is stored: `model.safetensors` + `config.json`, or for LoRA and partial fine-tunes the
trained tensors only (`adapter.safetensors` + `adapter_config.json`, naming the base); and how tensors
are read back into a model without unpickling anything. Loading a whole model is `finetune.formats.loading`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.checkpoints.atomic import MANIFEST, verify, write_directory
from finetune.data.files import read_json_object
from finetune.errors import UserError
from finetune.model.classifier import Model
from finetune.model.lora import lora_config, lora_layers, lora_state_dict

FORMAT = "finetune"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once, under their first name (e.g. `wte.weight`)."""
    return {name: t.detach().to("cpu").contiguous() for name, t in _untied(model).items()}


def model_files(model: Model, meta: dict) -> dict[str, Callable[[Path], object]]:
    """Writers for a model checkpoint: the weights and a JSON file describing how to rebuild them.

    A model that trains only part of itself (LoRA adapters, or some layers) on a base that `meta`
    names (`meta["base"]`) is saved as the trained tensors only: adapter.safetensors +
    adapter_config.json. A last-block run of GPT-2 124M then writes 28 MB per checkpoint, not 500 MB.
    Any other model is saved whole: model.safetensors + config.json.
    """
    config = {"format": FORMAT, **model.checkpoint_meta(), **meta}
    partial = bool(lora_layers(model)) or any(not p.requires_grad for p in model.parameters())
    if partial and "base" in meta:
        config["adapter"] = lora_config(model) if lora_layers(model) else {"layers": []}
        return {
            ADAPTER_FILE: lambda path: save_file(lora_state_dict(model), str(path)),
            ADAPTER_CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
        }
    return {
        MODEL_FILE: lambda path: save_file(model_state(model), str(path)),
        CONFIG_FILE: lambda path: path.write_text(json.dumps(config, indent=2)),
    }


def read_config(directory: Path, name: str = CONFIG_FILE) -> dict:
    path = Path(directory) / name
    if not path.exists():
        raise UserError(f"{directory}: not a checkpoint (no {name})")
    return read_json_object(path)


def read_meta(directory: Path) -> dict:
    """What a finetune checkpoint's config.json (or adapter_config.json) records: task, shape, labels, base, …."""
    directory = Path(directory)
    meta = read_config(directory, ADAPTER_CONFIG if (directory / ADAPTER_CONFIG).exists() else CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise UserError(f'{directory}: not a finetune checkpoint (config.json has no "format": "{FORMAT}")')
    return meta


def update_meta(directory: Path, updates: dict) -> None:
    """Rewrite a checkpoint's config.json (or adapter_config.json) with `updates`, keeping its other files
    as they are; atomically, as every checkpoint is written."""
    directory = Path(directory)
    verify(directory)
    name = ADAPTER_CONFIG if (directory / ADAPTER_CONFIG).exists() else CONFIG_FILE
    config = {**read_config(directory, name), **updates}
    kept = [p for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, name)]
    files: dict[str, Callable[[Path], object]] = {p.name: _copier(p) for p in kept}
    files[name] = lambda path: path.write_text(json.dumps(config, indent=2))
    write_directory(directory, files)


def _copier(source: Path) -> Callable[[Path], object]:
    return lambda path: shutil.copyfile(source, path)


def unreadable(path: Path, error: Exception) -> UserError:
    """The error for a weights file that its format's reader rejects (safetensors, torch zip, pickle)."""
    return UserError(f"{path}: cannot read weights ({type(error).__name__}: {error}); the file is corrupt or truncated")


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors file, one tensor in memory at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:  # safetensors reports corruption with its own error types
        raise unreadable(path, e) from e


def tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:  # safetensors reports corruption with its own error types
        raise unreadable(path, e) from e


def assemble(build: Callable[[], torch.nn.Module], tensors: Iterator[tuple[str, torch.Tensor]], source: Path):
    """Build a model on the meta device and assign `tensors` into it, after checking names and shapes.

    Peak memory is one copy of the weights. Tied parameters are expected once, under their first name.
    """
    with torch.device("meta"):
        model = build()
    expected = {name: t.shape for name, t in _untied(model).items()}
    tied = set(model.state_dict()) - set(expected)
    state, unexpected, mismatched = {}, [], []
    for name, t in tensors:
        if name in tied:
            continue
        if name not in expected:
            unexpected.append(name)
        elif t.shape != expected[name]:
            mismatched.append(f"{name} {tuple(t.shape)} != {tuple(expected[name])}")
        else:
            # One owned fp32 copy per tensor: never a view of a memory-mapped file, never a second copy.
            state[name] = torch.empty(t.shape, dtype=torch.float32).copy_(t)
    missing = sorted(set(expected) - set(state) - {m.split(" ")[0] for m in mismatched})
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:8])}{' …' if len(names) > 8 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if names
    ]
    if problems:
        raise UserError(f"{source}: weights do not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state, assign=True, strict=False)  # checked above; tied ones re-tied below
    for module in model.modules():
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()
    return model


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries, each tied parameter once (named_parameters drops the later names)."""
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: t for name, t in model.state_dict().items() if name in names}


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a checkpoint's weights (or adapter) into a model of the same architecture, strictly."""
    directory = Path(directory)
    if (directory / ADAPTER_FILE).exists():
        path, expected = directory / ADAPTER_FILE, {k: v.shape for k, v in lora_state_dict(model).items()}
    else:
        path, expected = directory / MODEL_FILE, {k: v.shape for k, v in _untied(model).items()}
    state = dict(read_tensors(path))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:4])}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if items
        )
        raise UserError(f"{path}: does not fit this model, was it saved for another base? ({details})")
    model.load_state_dict(state, strict=False)
