"""Next-token cross-entropy without the full vocabulary logits.

`F.cross_entropy(hidden @ weight.T, targets)` materialises batch × length × 50,257 logits, then as
many log-probabilities and gradients: hundreds of megabytes written and read again for a 4 × 256
batch. Here the logits of a few hundred rows at a time are computed, turned into their loss and,
while still in cache, into the gradients of `hidden` and `weight`; rows whose target is ignored
(prompt and padding) are never projected at all. The result equals the plain computation up to
floating-point summation order.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # targets the loss skips (F.cross_entropy's ignore_index)
# Rows whose logits are computed at once. CPU: 512 rows (103 MB of fp32 logits, and as much of
# log-probabilities) were the fastest on 2 cores: 8% faster than 256 rows, and 1,024 no faster.
# CUDA: larger products keep the GPU's matmul units busy (4096 rows: 206 MB of bf16 logits).
CHUNK_ROWS = {"cpu": 512, "cuda": 4096}


def next_token_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of a GPT's next-token predictions against `targets` (IGNORE = skip);
    `positions` and `segments` for packed rows (see GPT.forward).

    Call it where the model's forward runs (under the same autocast, as the trainer does): the
    vocabulary products then run in the autocast precision, as they would inside the model."""
    hidden = model(input_ids, positions=positions, segments=segments, return_hidden=True)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]
    head = cast(nn.Module, getattr(model, "module", model).lm_head)  # the GPT itself under DistributedDataParallel
    if type(head) is not nn.Linear or head.bias is not None:  # a LoRA head: its own forward
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    grad = torch.is_grad_enabled()
    return _ChunkedCrossEntropy.apply(
        hidden, head.weight, targets, grad and hidden.requires_grad, grad and head.weight.requires_grad
    )


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and the wanted gradients in one pass over row chunks; backward only scales them.

    The three vocabulary-sized products (logits, and the gradients of hidden and weight) run in the
    autocast dtype when autocast is on, as `F.linear` would; the log-softmax and the sums stay in fp32.
    Every chunk writes into the same few buffers: a fresh 50 MB tensor per chunk costs its page faults
    again (on a 2-core VM, allocating and first touching 150 MB took 65 ms, refilling it 9 ms)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        grad_of_hidden: bool,
        grad_of_weight: bool,
    ) -> torch.Tensor:
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        rows = min(CHUNK_ROWS.get(device, CHUNK_ROWS["cuda"]), max(hidden.shape[0], 1))
        w = weight.to(compute)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_of_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_of_weight else None
        logits = hidden.new_empty((rows, weight.shape[0]), dtype=compute)
        logprobs = torch.empty_like(logits, dtype=torch.float32)
        weight_part = torch.empty_like(w) if grad_of_weight and compute != torch.float32 else None
        with torch.autocast(device, enabled=False):  # dtypes are chosen here, explicitly
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start : start + rows].to(compute), targets[start : start + rows]
                z, logp = torch.mm(h, w.T, out=logits[: len(t)]), logprobs[: len(t)]
                torch.log_softmax(z, dim=1, dtype=torch.float32, out=logp)
                loss -= logp.gather(1, t[:, None]).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                probs = logp.exp_()  # d loss / d logits = softmax - one_hot(target)
                probs[torch.arange(len(t), device=t.device), t] -= 1
                if compute != torch.float32:
                    probs = z.copy_(probs)
                if grad_hidden is not None:
                    grad_hidden[start : start + rows] = probs @ w
                if grad_weight is not None and weight_part is None:
                    grad_weight.addmm_(probs.T, h)  # in place: no temporary vocab x n_embd matrix
                elif grad_weight is not None:
                    grad_weight += torch.mm(probs.T, h, out=weight_part)  # the product in bf16/fp16, summed in fp32
        ctx.gradients = grad_hidden, grad_weight
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.gradients is None:
            raise RuntimeError("next_token_loss: backward ran twice through the same loss; compute the loss again")
        grad_hidden, grad_weight = ctx.gradients
        ctx.gradients = None  # scaled in place below: a second backward would scale them twice
        for g in (grad_hidden, grad_weight):
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(B, T)` log-probability of each target under the model's logits / `temperature` (0 where the
    target is IGNORE): what policy-gradient methods weigh per token. Only the rows with a target are
    projected onto the vocabulary. `positions`, `segments`: packed rows (see GPT.forward)."""
    hidden = model(input_ids, positions=positions, segments=segments, return_hidden=True)
    keep = targets != IGNORE
    head = cast(nn.Module, getattr(model, "module", model).lm_head)  # the GPT itself under DistributedDataParallel
    logits = head(hidden[keep]).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, targets[keep][:, None]).squeeze(1) - logits.logsumexp(dim=1)
    return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mean: bool = False,
    packed: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each sequence's log-probability of its targets (IGNORE = skip), summed or averaged per target:
    what preference tuning compares. Summed in float64: a response's hundreds of log-probabilities
    would otherwise lose digits that DPO's differences of sums keep. One per row; for packed rows
    (`packed`: `positions`, `segments` and `slots`, the (row, segment) of each sequence wanted), one per slot."""
    if packed is None:
        per_token = token_logprobs(model, input_ids, targets)
        total, counts = per_token.sum(dim=1, dtype=torch.float64), (targets != IGNORE).sum(dim=1)
    else:
        segments = packed["segments"]
        per_token = token_logprobs(model, input_ids, targets, positions=packed["positions"], segments=segments)
        width = int(segments.max()) + 1
        cell = (torch.arange(len(segments), device=segments.device)[:, None] * width + segments).flatten()
        wanted = packed["slots"][:, 0] * width + packed["slots"][:, 1]
        total = per_token.new_zeros(len(segments) * width, dtype=torch.float64)
        total = total.index_add(0, cell, per_token.flatten().double())
        counts = torch.zeros_like(total).index_add(0, cell, (targets != IGNORE).flatten().double())
        total, counts = total[wanted], counts[wanted]
    total = total / counts.clamp(min=1) if mean else total
    return total.to(per_token.dtype)
