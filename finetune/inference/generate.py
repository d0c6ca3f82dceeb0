"""Autoregressive decoding: greedy or sampled, batched over prompts of different lengths, with a KV cache."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.errors import UserError
from finetune.model.gpt import GPT, KVCache
from finetune.model.tokenizer import get_tokenizer

# Temperatures below this decode greedily, as vLLM does: dividing logits by a temperature near zero
# overflows to inf (1e-45 does), and sampling from that distribution is argmax anyway.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


@dataclass
class Decoded:
    """What `decode` made: every row's prompt and new tokens, and each new token's log-probability."""

    tokens: torch.Tensor  # (B, T + n): prompts left-padded to T, then n new tokens (rows that ended: eos_id)
    logprobs: torch.Tensor  # (B, n) fp32: log-probability of each new token under the sampled distribution
    prompts: list[list[int]]  # the prompts as decoded (cut to the context)

    def rows(self) -> list[list[int]]:
        """Prompt + new tokens per row, without the left padding."""
        width = self.tokens.shape[1] - self.logprobs.shape[1]
        return [row[width - len(p) :] for row, p in zip(self.tokens.tolist(), self.prompts, strict=True)]


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
    stop: Sequence[str] = (),
) -> torch.Tensor | list[list[int]]:
    """Prompt + up to `max_new_tokens` new tokens.

    `idx` is a `(B, T)` LongTensor, or a list of token-id lists of any lengths (left-padded and masked
    internally). Every row gets the same n <= max_new_tokens new tokens, rows that hit `eos_id` early
    padded with it: a `(B, T + n)` tensor, or a list of lists (prompt + n) for list prompts. Greedy when
    `temperature` is 0 (or below GREEDY_BELOW). Prompts longer than the context keep their last tokens, with a warning.
    A row whose new text holds one of the `stop` strings ends there too (its text still holds the string).
    """
    decoded = decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, use_cache, stop)
    return decoded.tokens if isinstance(idx, torch.Tensor) else decoded.rows()


@torch.inference_mode()
def decode(
    model: GPT,
    idx: torch.Tensor | list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop: Sequence[str] = (),
) -> Decoded:
    """`generate`'s decoding, keeping each new token's log-probability under the model's distribution
    at `temperature` (logits / temperature, before top-k/top-p; the raw logits when greedy): what a
    policy-gradient method needs of the policy that sampled (GRPO's old log-probabilities)."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompts = _prompts(idx)
    context = model.config.context_length
    if any(len(p) > context - 1 for p in prompts):
        warnings.warn(
            f"prompt longer than {context - 1} tokens; keeping its last {context - 1}", stacklevel=5
        )  # past decode, generate and their inference_mode wrappers, to generate's caller
        prompts = [p[-(context - 1) :] for p in prompts]
    T = max(len(p) for p in prompts)
    n = min(max_new_tokens, context - T)
    if n < max_new_tokens:
        warnings.warn(
            f"context length {context} leaves room for {n} new tokens, not {max_new_tokens}", stacklevel=5
        )  # past decode, generate and their inference_mode wrappers, to generate's caller

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
    logprobs = []
    step_input, step_positions = tokens, positions
    for _ in range(n):
        mask = key_mask if padded else None
        if cache is None:  # re-run the whole sequence every step (reference path)
            step_input, step_positions = tokens, positions
        hidden = model(step_input, attention_mask=mask, positions=step_positions, cache=cache, return_hidden=True)
        logits = model.lm_head(hidden[:, -1, :])  # vocabulary logits for the last position only
        next_token = _next_token(logits, temperature, top_k, top_p, generator)
        scaled = logits.float() if is_greedy(temperature) else logits.float() / temperature
        logprob = scaled.log_softmax(-1).gather(1, next_token[:, None]).squeeze(1)
        if eos_id is not None:
            next_token = torch.where(finished, eos_id, next_token)
            logprob = logprob.masked_fill(finished, 0.0)
            finished |= next_token == eos_id
        logprobs.append(logprob)
        next_position = positions[:, -1:] + 1
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        positions = torch.cat([positions, next_position], dim=1)
        key_mask = torch.cat([key_mask, torch.ones_like(next_position)], dim=1)
        step_input, step_positions = next_token[:, None], next_position
        if stop and eos_id is not None:
            finished |= _stopped(tokens[:, T:], finished, stop)
        if finished.all():
            break
    model.train(was_training)
    new = torch.stack(logprobs, dim=1) if logprobs else torch.zeros(B, 0, device=device)
    return Decoded(tokens, new, prompts)


def _stopped(new: torch.Tensor, finished: torch.Tensor, stop: Sequence[str]) -> torch.Tensor:
    """Rows whose new tokens end in text holding a stop string (only the last tokens that could hold one are
    decoded: a token is at least one byte, a character at most four)."""
    window = 4 * max(len(s) for s in stop)
    tokenizer = get_tokenizer()
    hit = torch.zeros_like(finished)
    for b in (~finished).nonzero().flatten().tolist():
        tail = tokenizer.decode(new[b, -window:].tolist(), errors="ignore")
        hit[b] = any(s in tail for s in stop)
    return hit


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
    return sample(filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1), generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, block: int = 1024) -> torch.Tensor:
    """One token per row of `(B, vocab)` probabilities, by inverting the cumulative distribution at a
    uniform draw: the same distribution as torch.multinomial, about 10x faster on CPU over GPT-2's 50,257
    tokens (multinomial spends 120 ms on 128 rows on 2 cores; GRPO samples such batches every token).

    The distribution is cut into blocks: the draw picks a block by the blocks' cumulative masses (float64),
    then a token by the cumulative sum inside it (float32, so its rounding is relative to one block's mass,
    not to the whole distribution's)."""
    B, V = probs.shape
    blocks = -(-V // block)
    inside = F.pad(probs.float(), (0, blocks * block - V)).view(B, blocks, block).cumsum(dim=-1)
    ends = inside[:, :, -1].double().cumsum(dim=-1)  # (B, blocks): mass up to each block's end
    draw = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device) * ends[:, -1:]
    draw = torch.minimum(draw, torch.nextafter(ends[:, -1:], torch.zeros_like(draw)))  # below the total, always
    chosen = torch.searchsorted(ends, draw, right=True).clamp_(max=blocks - 1)  # (B, 1)
    before = torch.where(chosen > 0, ends.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    cumulative = inside[torch.arange(B, device=probs.device), chosen[:, 0]]  # (B, block)
    rest = (draw - before).to(cumulative.dtype).clamp_(max=cumulative[:, -1:])
    index = torch.searchsorted(cumulative, rest, right=True).clamp_(max=block - 1)
    # A draw on a block's last rounding step lands past its last token with mass: take that token.
    last_with_mass = (cumulative < cumulative[:, -1:]).sum(-1, keepdim=True)
    return (chosen * block + torch.minimum(index, last_with_mass)).squeeze(1)
