"""The one checkpoint format: a directory with `model.safetensors` + `config.json`, written atomically.

A checkpoint directory is built under a temporary name, every file fsync'd, then renamed into place,
so it is either complete or absent. Training state (optimizer moments, RNG) is stored as safetensors
plus JSON too: resuming never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.errors import UserError

FORMAT = "finetune"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# -- writing ------------------------------------------------------------------------------------


def write_directory(directory: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Create `directory` holding `files` (name -> writer of that path) atomically, replacing any old one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, write in files.items():
        write(tmp / name)
        _fsync(tmp / name)
    _fsync(tmp)
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)
    _fsync(directory.parent)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    _fsync(tmp)
    tmp.replace(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once, under their first name (e.g. `wte.weight`)."""
    return {name: t.detach().to("cpu").contiguous() for name, t in _untied(model).items()}


def model_files(model: torch.nn.Module, meta: dict) -> dict[str, Callable[[Path], None]]:
    """Writers for a model checkpoint: the weights and a config.json describing how to rebuild it."""
    config = {"format": FORMAT, **model.checkpoint_meta(), **meta}
    return {
        MODEL_FILE: lambda path: save_file(model_state(model), str(path)),
        CONFIG_FILE: lambda path: path.write_text(json.dumps(config, indent=2)),
    }


# -- reading ------------------------------------------------------------------------------------


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not a checkpoint (no {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors file, one tensor in memory at a time."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:  # safetensors reports corruption with its own error types
        raise UserError(f"{path}: cannot read weights ({type(e).__name__}: {e}); the file is corrupt or truncated") from e


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
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    return model


def _untied(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries, each tied parameter once (named_parameters drops the later names)."""
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: t for name, t in model.state_dict().items() if name in names}


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a checkpoint's weights into an existing model (same architecture), strictly."""
    path = Path(directory) / MODEL_FILE
    state = dict(read_tensors(path))
    expected = set(_untied(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    model.load_state_dict(state, strict=False)


def load_model(directory: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by finetune, and its config.json."""
    from finetune.classifier import GPTClassifier
    from finetune.model import GPT, GPTConfig

    directory = Path(directory)
    meta = read_config(directory)
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory}: not a finetune checkpoint (config.json has no \"format\": \"{FORMAT}\")")
    try:
        config = GPTConfig.from_dict(meta["model"])
        task = meta["task"]
        builders = {
            "lm": lambda: GPT(config),
            "classification": lambda: GPTClassifier(GPT(config), meta["num_classes"], meta["pool"]),
        }
        build = builders[task]
    except (KeyError, TypeError) as e:
        raise UserError(f"{directory / CONFIG_FILE}: missing or bad entry {e}") from e
    return assemble(build, read_tensors(directory / MODEL_FILE), directory / MODEL_FILE), meta


# -- training state -----------------------------------------------------------------------------

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"


def training_state_files(optimizer: torch.optim.Optimizer, trainer_state: dict) -> dict[str, Callable[[Path], None]]:
    """Optimizer moments and RNG as tensors, the rest (step, data position, param groups) as JSON."""
    opt = optimizer.state_dict()
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    for param_id, values in opt["state"].items():
        for key, value in values.items():
            tensors[f"optim.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
    document = {**trainer_state, "param_groups": opt["param_groups"]}
    return {
        STATE_TENSORS: lambda path: save_file(tensors, str(path)),
        STATE_JSON: lambda path: path.write_text(json.dumps(document, indent=2)),
    }


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG from a checkpoint; return the trainer's own state."""
    document = read_json(Path(directory) / STATE_JSON)
    tensors = dict(read_tensors(Path(directory) / STATE_TENSORS))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": document.pop("param_groups")})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return document


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the checkpoint is corrupt") from e
