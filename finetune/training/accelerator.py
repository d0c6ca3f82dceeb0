"""The run's accelerator (Hugging Face accelerate): its mixed precision, checked against how the run was
launched, the distributed setups the trainer supports, TF32 on GPUs, and what the run records of them."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune.config import TrainSection
from finetune.errors import UserError

# Sharded training needs the loss, clipping and checkpoints written for sharded parameters; DDP is supported.
UNSUPPORTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)


def make_accelerator(train: TrainSection) -> Accelerator:
    """The run's accelerator. Its mixed precision is the one every part of the run follows:
    `train.mixed_precision`, or when that is unset, what accelerate was launched with."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    wanted = train.mixed_precision
    if wanted is not None and launched is not None and launched != wanted:
        raise UserError(
            f"train.mixed_precision={wanted} but accelerate was launched with mixed precision "
            f"'{launched}'; launch with --mixed_precision {wanted}, or leave train.mixed_precision unset"
        )
    accelerator = _accelerator(wanted)
    if accelerator.distributed_type in UNSUPPORTED:
        raise UserError(
            f"{accelerator.distributed_type.value} is not supported; launch on one device or with "
            "DDP (accelerate launch --multi_gpu, or --num_processes N on CPU)"
        )
    set_tf32(accelerator.device, train.tf32)
    return accelerator


def _accelerator(mixed_precision: str | None) -> Accelerator:
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one state per process, and a later Accelerator() would inherit the first
        # one's precision: a run in a process that ran another (a notebook, the tests) starts afresh.
        AcceleratorState._reset_state()
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError as e:
        raise UserError(f"train.mixed_precision={mixed_precision}: {' '.join(str(e).split())}") from e


def environment(accelerator: Accelerator) -> dict:
    """How the run really ran, after accelerate's launch settings: recorded in metrics.json."""
    return {
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
    }


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls (10-bit mantissa, fp32 range) for fp32 work on CUDA GPUs that have them: several
    times the fp32 throughput, at about bf16-autocast accuracy for the products. CPUs are left alone."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


BF16_SPEEDUP = "2.1-2.4x as fast"  # benchmarks/train_step.py --precision fp32 bf16, 2026-12-03 (docs/gpus.md)


def bf16_hint(accelerator: Accelerator) -> str | None:
    """One line for a run that trains in fp32 on a CPU with bf16 matrix instructions (AVX512-BF16 or AMX),
    where bf16 autocast roughly halves a step (docs/gpus.md, measured); None elsewhere."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "no" or not cpu_has_bf16():
        return None
    return (
        "this CPU has bf16 instructions: train.mixed_precision=bf16 would train faster here (GPT-2 124M "
        f"steps {BF16_SPEEDUP} on a 2-core AMD EPYC with AVX512-BF16; docs/gpus.md)"
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16, or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
