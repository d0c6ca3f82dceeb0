"""A trainer's state beside the model in a resumable checkpoint: optimizer moments and RNG states as
safetensors, the rest (step, data position, param groups) as JSON, so that resuming unpickles nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.checkpoint import read_json
from finetune.serialization import read_tensors

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
