"""Options that several commands share, kept apart from `finetune.cli.main` so that command modules
depend on it and the CLI depends on them, never the other way round."""

from __future__ import annotations

import argparse

BF16_HELP = "bf16 weights: half the memory, faster decoding; tokens may differ slightly from fp32"
STYLE_HELP = (
    "prompt style for a model that stores none (alpaca, phi3, plain, or a template with {instruction}); "
    "a trained model's own style is used otherwise"
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def weights_dtype(model, bf16: bool):
    """--bf16: half the memory, and faster decoding where the CPU or GPU computes in bf16."""
    import torch

    return model.to(torch.bfloat16) if bf16 else model
