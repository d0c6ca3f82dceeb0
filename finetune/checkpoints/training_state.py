"""A trainer's state beside the model in a resumable checkpoint: optimizer moments and every process's
RNG states as safetensors, the rest (step, data position, param groups) as JSON, so that resuming
unpickles nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.checkpoints.model_files import read_tensors
from finetune.data.files import read_json_object
from finetune.errors import UserError

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generators: the CPU one and its own accelerator's (dropout draws from both)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def training_state_files(
    optimizer: torch.optim.Optimizer, trainer_state: dict, rng_states: list[dict[str, torch.Tensor]]
) -> dict[str, Callable[[Path], object]]:
    """Optimizer moments and the RNG states of every process (`rng_states[rank]`) as tensors; the rest
    (step, data position, param groups) as JSON."""
    opt = optimizer.state_dict()
    tensors = {f"rng.{rank}.{name}": state for rank, states in enumerate(rng_states) for name, state in states.items()}
    for param_id, values in opt["state"].items():
        for key, value in values.items():
            tensors[f"optim.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
    document = {**trainer_state, "param_groups": opt["param_groups"]}
    return {
        STATE_TENSORS: lambda path: save_file(tensors, str(path)),
        STATE_JSON: lambda path: path.write_text(json.dumps(document, indent=2)),
    }


def load_training_state(
    directory: Path, optimizer: torch.optim.Optimizer, rank: int, processes: int, device: torch.device
) -> dict:
    """Restore the optimizer and process `rank`'s RNG states from a checkpoint written by as many
    processes; return the trainer's own state."""
    document = read_json_object(Path(directory) / STATE_JSON, "; the checkpoint is corrupt")
    if document.get("processes") != processes:
        written = document.get("processes") or "an unknown number of"
        raise UserError(
            f"{directory}: written by {written} processes, resumed on {processes}; resume with the "
            "same number of processes (the data order and each one's random state depend on it)"
        )
    tensors = dict(read_tensors(Path(directory) / STATE_TENSORS))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": document.pop("param_groups")})
    torch.set_rng_state(tensors[f"rng.{rank}.cpu"])
    if device.type == "cuda" and f"rng.{rank}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.{rank}.cuda"], device)
    return document
