"""Which parameters train: the whole model, its last blocks (plus final norm and heads), or the heads."""

from __future__ import annotations

import warnings

import torch.nn as nn

from finetune.config import LoraSection, RunConfig
from finetune.errors import UserError
from finetune.model.classifier import GPTClassifier
from finetune.model.gpt import GPT
from finetune.model.lora import (
    LoRALinear,
    M,
    apply_lora,
    lora_layers,
    merged_model,
    unfreeze_modules,
)


def configure_trainable(model: M, config: RunConfig) -> M:
    """Freeze or adapt `model` as `finetune.trainable` (and `lora.*`) say; the one entry point for recipes.

    A model that comes with LoRA layers (a PEFT adapter named as `model.name`) goes on training them
    with `trainable=lora`, at the adapter's own rank, alpha and layers; any other choice trains the
    model with the adapter merged in."""
    imported = lora_layers(model)
    if config.finetune.trainable == "lora":
        lora = config.lora
        if imported:
            _warn_if_ignored(lora, imported[0], len(imported))
            model.requires_grad_(False)
            for layer in imported:
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
        else:
            apply_lora(model, lora.rank, lora.alpha, lora.targets, lora.dropout)
        unfreeze_modules(model, lora.train_modules)
    else:
        if imported:
            merged_model(model)
        mark_trainable(model, config.finetune.trainable, config.finetune.n_blocks)
    freeze_unread(model)
    return model


def _warn_if_ignored(lora: LoraSection, layer: LoRALinear, count: int) -> None:
    """The lora.* keys a user set that an imported adapter overrides."""
    ours = {"rank": layer.rank, "alpha": layer.alpha, "dropout": layer.lora_dropout.p}
    ignored = [
        f"lora.{k}={getattr(lora, k)}" for k in ours if k in lora.model_fields_set and getattr(lora, k) != ours[k]
    ]
    if ignored or "targets" in lora.model_fields_set:
        warnings.warn(
            f"model.name is a LoRA adapter: training goes on with its own {count} layers "
            f"(rank {layer.rank}, alpha {layer.alpha:g}, dropout {layer.lora_dropout.p:g}); "
            f"ignored: {', '.join(ignored + (['lora.targets'] if 'targets' in lora.model_fields_set else []))}",
            stacklevel=2,
        )


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
