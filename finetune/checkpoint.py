"""The one checkpoint format: a directory with `model.safetensors` + `config.json`, written atomically
(or, for LoRA and partial fine-tunes, the trained tensors only: `adapter.safetensors` +
`adapter_config.json`, which names the base).

A checkpoint directory is built under a temporary name, every file fsync'd, then renamed into place,
so it is either complete or absent. Training state (optimizer moments, RNG) is stored as safetensors
plus JSON too: resuming never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.errors import UserError

FORMAT = "finetune"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# -- writing ------------------------------------------------------------------------------------


MANIFEST = "manifest.json"


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (truncated, damaged, or half-written)."""


def write_directory(directory: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Create `directory` holding `files` (name -> writer of that path) atomically, replacing any old one.

    Everything is written under a temporary name with a manifest of SHA-256 sums, fsync'd, then
    renamed into place: a reader sees the old directory or the complete new one, never a mix.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {}
    for name, write in files.items():
        write(tmp / name)
        _fsync(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync(tmp / MANIFEST)
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


def recover(directory: Path) -> None:
    """Finish a replacement that was cut between its two renames: bring the old copy back."""
    directory = Path(directory)
    old = directory.with_name(f".old-{directory.name}")
    if old.is_dir() and not directory.exists():
        old.rename(directory)
    elif old.is_dir():
        shutil.rmtree(old)


def verify(directory: Path) -> None:
    """Check every file of a checkpoint against its manifest; raise CorruptCheckpoint naming the first bad one."""
    directory = Path(directory)
    recover(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{directory}: no {MANIFEST}; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{directory / MANIFEST}: unreadable ({e}); the checkpoint is corrupt") from e
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing; the checkpoint is incomplete")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"{path}: {path.stat().st_size} bytes, expected {expected['bytes']}; "
                                    "the file was truncated or changed after saving")
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpoint(f"{path}: checksum mismatch; the file is corrupt or was changed after saving")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Writers for a model checkpoint: the weights and a JSON file describing how to rebuild them.

    A model that trains only part of itself (LoRA adapters, or some layers) on a base that `meta`
    names (`meta["base"]`) is saved as the trained tensors only: adapter.safetensors +
    adapter_config.json. A last-block run of GPT-2 124M then writes 28 MB per checkpoint, not 500 MB.
    Any other model is saved whole: model.safetensors + config.json.
    """
    from finetune.lora import lora_config, lora_layers, lora_state_dict

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


# -- reading ------------------------------------------------------------------------------------


def read_config(directory: Path, name: str = CONFIG_FILE) -> dict:
    path = Path(directory) / name
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory}: not a checkpoint (no {name})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


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
    """Load a checkpoint's weights (or adapter) into a model of the same architecture, strictly."""
    from finetune.lora import lora_state_dict

    directory = Path(directory)
    if (directory / ADAPTER_FILE).exists():
        path, expected = directory / ADAPTER_FILE, {k: v.shape for k, v in lora_state_dict(model).items()}
    else:
        path, expected = directory / MODEL_FILE, {k: v.shape for k, v in _untied(model).items()}
    state = dict(read_tensors(path))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        details = "; ".join(f"{label}: {', '.join(items[:4])}" for label, items in
                            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items)
        raise UserError(f"{path}: does not fit this model, was it saved for another base? ({details})")
    model.load_state_dict(state, strict=False)


def read_meta(directory: Path) -> dict:
    """What a finetune checkpoint's config.json (or adapter_config.json) records: task, shape, labels, base, …."""
    directory = Path(directory)
    meta = read_config(directory, ADAPTER_CONFIG if (directory / ADAPTER_CONFIG).exists() else CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise UserError(f"{directory}: not a finetune checkpoint (config.json has no \"format\": \"{FORMAT}\")")
    return meta


def load_model(directory: Path, dropout: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by finetune (full weights, or base + adapter), and its config, after
    checking its files against the manifest. `dropout` is a training setting, not part of the checkpoint."""
    directory = Path(directory)
    adapter = (directory / ADAPTER_CONFIG).exists()
    meta = read_meta(directory)
    verify(directory)
    if adapter:
        return _load_adapter_model(directory, dropout)
    build = _builder(meta, directory / CONFIG_FILE)
    config = replace(_gpt_config(meta, directory / CONFIG_FILE), dropout=dropout)
    return assemble(lambda: build(config), read_tensors(directory / MODEL_FILE), directory / MODEL_FILE), meta


def _gpt_config(meta: dict, where: Path):
    from finetune.model import GPTConfig

    try:
        return GPTConfig.from_dict(meta["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{where}: missing or bad 'model' entry ({e})") from e


def _builder(meta: dict, where: Path) -> Callable:
    """A function GPT -> the model of this checkpoint's task (a GPTConfig gives a fresh trunk)."""
    from finetune.classifier import GPTClassifier
    from finetune.model import GPT

    def trunk(gpt):
        return gpt if isinstance(gpt, GPT) else GPT(gpt)

    task = meta.get("task")
    if task == "lm":
        return trunk
    if task == "classification":
        try:
            num_classes, pool = meta["num_classes"], meta["pool"]
        except KeyError as e:
            raise UserError(f"{where}: classification checkpoint without {e}") from e
        return lambda gpt: GPTClassifier(trunk(gpt), num_classes, pool)
    raise UserError(f"{where}: unknown task {task!r}")


def _load_adapter_model(directory: Path, dropout: float) -> tuple[torch.nn.Module, dict]:
    """Base model (by name, or re-made from its seed when it was a random init) + the trained tensors
    (LoRA layers and whatever trained beside them, or the trained layers of a partial fine-tune)."""
    from finetune import build_model
    from finetune.lora import wrap_layers

    where = directory / ADAPTER_CONFIG
    meta = read_config(directory, ADAPTER_CONFIG)
    try:
        base, adapter = meta["base"], meta["adapter"]
        expected = _gpt_config(meta, where)
        torch.manual_seed(base["seed"])  # a random-init base is re-made exactly as the run made it
        gpt = build_model(base["name"], base["init"], dropout)
    except KeyError as e:
        raise UserError(f"{where}: missing entry {e}") from e
    if replace(gpt.config, dropout=0.0) != replace(expected, dropout=0.0):
        raise UserError(f"{where}: the adapter was trained on a base of shape {expected.to_dict()}, "
                        f"but '{base['name']}' has shape {gpt.config.to_dict()}")
    model = _builder(meta, where)(gpt)
    if adapter["layers"]:
        wrap_layers(model, adapter["layers"], adapter["rank"], adapter["alpha"], adapter["dropout"])
    stored = tensor_names(directory / ADAPTER_FILE)
    for name, p in model.named_parameters():  # as in training: adapters and the modules trained beside them
        p.requires_grad = "lora_" in name or name in stored
    load_weights(model, directory)
    return model, meta


def tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:  # safetensors reports corruption with its own error types
        raise unreadable(path, e) from e


# -- a run's checkpoints ------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/step-NNNNNNN/: resumable
BEST = "best"  # <output_dir>/best/: the model with the best validation metric


def checkpoint_dirs(out: Path) -> list[Path]:
    """A run's resumable checkpoints, oldest first."""
    return sorted(p for p in (Path(out) / CHECKPOINTS).glob("step-*") if p.is_dir())


def kept_checkpoint(out: Path) -> Path:
    """The checkpoint a run keeps for use: best/, or else its last one."""
    recover(Path(out) / BEST)
    if (Path(out) / BEST).is_dir():
        return Path(out) / BEST
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise UserError(f"{out}: no checkpoint found (no {BEST}/ or {CHECKPOINTS}/step-*/); was the run trained?")
    return dirs[-1]


def resolve(path: Path) -> Path:
    """A checkpoint directory as given, or the kept checkpoint of a run directory (one with config.yaml)."""
    path = Path(path)
    return kept_checkpoint(path) if (path / "config.yaml").is_file() else path


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
