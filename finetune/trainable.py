"""Which parameters train: the whole model, its last blocks (plus final norm and heads), or the heads."""

from __future__ import annotations

import torch.nn as nn

from finetune.classifier import GPTClassifier
from finetune.config import RunConfig
from finetune.errors import UserError
from finetune.lora import apply_lora, unfreeze_modules
from finetune.model import GPT


def configure_trainable(model: nn.Module, config: RunConfig) -> nn.Module:
    """Freeze or adapt `model` as `finetune.trainable` (and `lora.*`) say; the one entry point for recipes."""
    if config.finetune.trainable == "lora":
        lora = config.lora
        apply_lora(model, lora.rank, lora.alpha, lora.targets, lora.dropout)
        unfreeze_modules(model, lora.train_modules)
    else:
        mark_trainable(model, config.finetune.trainable, config.finetune.n_blocks)
    freeze_unread(model)
    return model


def freeze_unread(model: nn.Module) -> None:
    """A classifier never reads its GPT's vocabulary head. When the head is its own tensor (not tied to
    the token embedding) it gets no gradient, and DDP stops at the second step over a trainable
    parameter that received none: it stays frozen."""
    if isinstance(model, GPTClassifier) and not model.gpt.config.tie_embeddings:
        model.gpt.lm_head.requires_grad_(False)


def mark_trainable(model: nn.Module, trainable: str, n_blocks: int = 1) -> None:
    """Set `requires_grad` for `finetune.trainable`: `all`, `last_block`, `last_n_blocks` (with
    `n_blocks`) or `head`. Modules outside the GPT trunk (a classification head) always train."""
    gpt = next((m for m in model.modules() if isinstance(m, GPT)), None)
    if gpt is None:
        raise UserError("the model has no GPT trunk to select trainable layers from")
    if trainable == "all":
        model.requires_grad_(True)
        return
    trunk_only = all(any(p is q for q in gpt.parameters()) for p in model.parameters())
    if trainable == "head" and trunk_only:
        raise UserError("finetune.trainable=head needs a model with its own head (e.g. the spam classifier)")
    if trainable == "last_block":
        n_blocks = 1
    elif trainable == "head":
        n_blocks = 0
    elif trainable != "last_n_blocks":
        raise UserError(f"finetune.trainable must be all, last_block, last_n_blocks or head, got '{trainable}'")
    if n_blocks > gpt.config.n_layer:
        raise UserError(f"finetune.n_blocks={n_blocks} but the model has only {gpt.config.n_layer} blocks")
    model.requires_grad_(True)
    gpt.requires_grad_(False)
    if n_blocks:
        for block in gpt.blocks[-n_blocks:]:
            block.requires_grad_(True)
        gpt.ln_f.requires_grad_(True)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
