"""Autoregressive decoding: greedy or sampled, batched over prompts of different lengths, with a KV cache."""

from __future__ import annotations

import warnings

import torch

from finetune.errors import UserError
from finetune.model.gpt import GPT, KVCache

# Temperatures below this decode greedily, as vLLM does: dividing logits by a temperature near zero
# overflows to inf (1e-45 does), and sampling from that distribution is argmax anyway.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor | list[list[int]]:
    """Prompt + up to `max_new_tokens` new tokens.

    `idx` is a `(B, T)` LongTensor, or a list of token-id lists of any lengths (left-padded and masked
    internally). Every row gets the same n <= max_new_tokens new tokens, rows that hit `eos_id` early
    padded with it: a `(B, T + n)` tensor, or a list of lists (prompt + n) for list prompts. Greedy when
    `temperature` is 0 (or below GREEDY_BELOW). Prompts longer than the context keep their last tokens, with a warning.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    as_list = not isinstance(idx, torch.Tensor)
    prompts = _prompts(idx)
    context = model.config.context_length
    if any(len(p) > context - 1 for p in prompts):
        warnings.warn(
            f"prompt longer than {context - 1} tokens; keeping its last {context - 1}", stacklevel=3
        )  # past the inference_mode wrapper, to the caller
        prompts = [p[-(context - 1) :] for p in prompts]
    T = max(len(p) for p in prompts)
    n = min(max_new_tokens, context - T)
    if n < max_new_tokens:
        warnings.warn(
            f"context length {context} leaves room for {n} new tokens, not {max_new_tokens}", stacklevel=3
        )  # past the inference_mode wrapper, to the caller

    device = next(model.parameters()).device
    pad = eos_id if eos_id is not None else 0
    tokens = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)
    key_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    padded = bool((key_mask == 0).any())
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    B = len(prompts)
    cache = KVCache(model.config, B, T + n) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step_input, step_positions = tokens, positions
    for _ in range(n):
        mask = key_mask if padded else None
        if cache is None:  # re-run the whole sequence every step (reference path)
            step_input, step_positions = tokens, positions
        hidden = model(step_input, attention_mask=mask, positions=step_positions, cache=cache, return_hidden=True)
        logits = model.lm_head(hidden[:, -1, :])  # vocabulary logits for the last position only
        next_token = _next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = torch.where(finished, eos_id, next_token)
            finished |= next_token == eos_id
        next_position = positions[:, -1:] + 1
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        positions = torch.cat([positions, next_position], dim=1)
        key_mask = torch.cat([key_mask, torch.ones_like(next_position)], dim=1)
        step_input, step_positions = next_token[:, None], next_position
        if finished.all():
            break
    model.train(was_training)

    if not as_list:
        return tokens
    return [row[T - len(p) :] for row, p in zip(tokens.tolist(), prompts, strict=True)]  # without the left padding


def _prompts(idx: torch.Tensor | list[list[int]]) -> list[list[int]]:
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise UserError(f"prompt tensor must be (batch, length) with length >= 1, got shape {tuple(idx.shape)}")
        return idx.tolist()
    prompts = [list(p) for p in idx]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    return prompts


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits to sample from: divided by `temperature` (> 0), then all but the `top_k` largest set to
    -inf, then all but the smallest set of tokens holding `top_p` of the probability mass (the order and
    rules of transformers' temperature, top-k and top-p warpers)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keeps the top one).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
