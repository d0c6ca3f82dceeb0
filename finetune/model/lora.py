"""LoRA (Hu et al., 2021), written out: y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ, with W and b frozen.

Targets are Linear modules named by their path suffix:
    attn.qkv   fused query/key/value projection of every block (one rank-r adapter for all three)
    attn.proj  attention output projection
    mlp.fc     MLP up-projection
    mlp.proj   MLP down-projection
    head       the classification head (spam recipe)
    lm_head    the vocabulary head, only when it is not tied to the token embedding
    all-linear every one of the above that the model has

A LoRA layer keeps the base layer's `weight` and `bias` under the same names, so base checkpoints
load into a LoRA model unchanged; its own parameters are `lora_A` and `lora_B`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from finetune.errors import UserError
from finetune.model.classifier import GPTClassifier
from finetune.model.gpt import GPT

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "head", "lm_head")
ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.disabled = False  # the base layer alone (adapters_disabled): the model before this adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        dropped = self.lora_dropout(x) if self.training and self.lora_dropout.p > 0 else x
        return _LoRAProduct.apply(x, dropped, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)

    def delta(self) -> torch.Tensor:
        """(α/r)·B·A in fp32, whatever the parameters' dtype."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class _LoRAProduct(torch.autograd.Function):
    """x Wᵀ + b + s·(x' Aᵀ) Bᵀ (x' = dropout(x)) with the low-rank term added inside the second product
    (addmm's accumulate) and scaled on the rank-r side, forward and backward. Written as separate
    operations, autograd makes four passes over batch × out_features tensors (the low-rank product, its
    scaling, the sum, the scaling's backward) and two over batch × in_features (the low-rank input
    gradient and its sum): 9% of a LoRA step on 2 CPU cores. Under autocast the products run in the
    autocast dtype, as F.linear's would."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        dropped: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x2, d2 = x.reshape(-1, x.shape[-1]).to(compute), dropped.reshape(-1, x.shape[-1]).to(compute)
        w, a, b = weight.to(compute), lora_A.to(compute), lora_B.to(compute)
        with torch.autocast(device, enabled=False):
            y = x2 @ w.T if bias is None else torch.addmm(bias.to(compute), x2, w.T)
            low = d2 @ a.T  # (N, r)
            y.addmm_(low, b.T, alpha=scaling)
        ctx.save_for_backward(x2, d2, w, a, b, low)
        ctx.scaling, ctx.same_input = scaling, dropped is x
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, d2, w, a, b, low = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, w.shape[0]).to(w.dtype)
        g_low = g @ b  # (N, r): the gradient reaching the rank-r activations, unscaled
        grad_x = grad_dropped = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ w
            if ctx.same_input:
                grad_x.addmm_(g_low, a, alpha=s)
            grad_x = grad_x.reshape(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1] and not ctx.same_input:
            grad_dropped = (torch.mm(g_low, a) * s).reshape(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[2]:
            grad_w = g.T @ x2
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        grad_a = torch.mm(g_low.T, d2).mul_(s) if ctx.needs_input_grad[4] else None
        grad_b = torch.mm(g.T, low).mul_(s) if ctx.needs_input_grad[5] else None
        return grad_x, grad_dropped, grad_w, grad_bias, grad_a, grad_b, None


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...], dropout: float = 0.0
) -> nn.Module:
    """Replace the target Linear layers by LoRA layers in place and freeze every non-LoRA parameter."""
    if rank < 1:
        raise UserError(f"lora.rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise UserError(f"lora.alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise UserError(f"lora.dropout must be in [0, 1), got {dropout}")
    wrap_layers(model, resolve_targets(model, targets), rank, alpha, dropout)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def wrap_layers(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float) -> None:
    """Replace the Linear layers with these full names by LoRA layers."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child, None)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"cannot apply LoRA to {name!r}: not a Linear layer of this model")
        setattr(owner, child, LoRALinear(layer, rank, alpha, dropout))


def resolve_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Full module names of the Linear layers that `targets` name."""
    if not targets:
        raise UserError(f"lora.targets is empty; choose from {', '.join((*TARGETS, ALL_LINEAR))}")
    unknown = [t for t in targets if t not in TARGETS and t != ALL_LINEAR]
    if unknown:
        raise UserError(f"unknown LoRA target {unknown[0]!r}; valid targets: {', '.join((*TARGETS, ALL_LINEAR))}")
    tied = _tied_head(model)
    unread = "gpt.lm_head" if isinstance(model, GPTClassifier) else None  # a classifier never reads it
    wanted = set(TARGETS) if ALL_LINEAR in targets else set(targets)
    if unread is not None and "lm_head" in targets:
        raise UserError("LoRA target 'lm_head': a classifier never uses the vocabulary head; target 'head' instead")
    if tied is not None and "lm_head" in targets:
        raise UserError("LoRA target 'lm_head' is tied to the token embedding; merging would change the embedding")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LoRALinear))
        and name not in (tied, unread)
        and any(name == t or name.endswith("." + t) for t in wanted)
    ]
    if any(isinstance(model.get_submodule(n), LoRALinear) for n in names):
        raise UserError("the model already has LoRA layers")
    missing = [t for t in targets if t != ALL_LINEAR and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"LoRA target {missing[0]!r} matches no layer of this model")
    return names


def _tied_head(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, GPT) and module.config.tie_embeddings:
            return f"{name}.lm_head" if name else "lm_head"
    return None


M = TypeVar("M", bound=nn.Module)  # a model handed back as it came, adapters merged or not


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: M) -> M:
    """W ← W + (α/r)·B·A for every LoRA layer (computed in fp32); the LoRA path is then skipped."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: M) -> M:
    """W ← W − (α/r)·B·A: the inverse of merge_lora, to within fp32 rounding (about 1 ulp of W)."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def merged_model(model: M) -> M:
    """A plain model with the adapters folded in: every LoRA layer replaced by an nn.Linear."""
    merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=module.weight.dtype,
            )
            plain.weight, plain.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` without its (unmerged) adapters for the duration: the base they were trained on, with no
    second copy held (a reference model for a KL penalty)."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers):
        raise ValueError("adapters_disabled: merged adapters are part of the weights; unmerge them first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the LoRA A/B matrices, every other trainable parameter (the
    `lora.train_modules`), and every parameter outside the GPT trunk (a classification head, which
    no base checkpoint can restore). Everything else comes from the base model."""
    trunk = {id(p) for m in model.modules() if isinstance(m, GPT) for p in m.parameters()}
    return {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if "lora_" in name or p.requires_grad or id(p) not in trunk
    }


def lora_config(model: nn.Module) -> dict:
    """Rank, alpha, dropout and the adapted layers, as recorded in adapter_config.json."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise UserError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p, "layers": sorted(layers)}


def unfreeze_modules(model: nn.Module, names: list[str]) -> None:
    """Train whole modules beside the adapters (`lora.train_modules`, e.g. the classification head)."""
    for target in names:
        matches = [m for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        if not matches:
            valid = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            raise UserError(f"lora.train_modules: {target!r} matches no module; e.g. {', '.join(valid[:10])}")
        for module in matches:
            module.requires_grad_(True)
