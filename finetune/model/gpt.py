"""GPT-2, top to bottom.

The architecture of OpenAI's GPT-2 (pre-LayerNorm blocks, fused q/k/v projection with biases,
tanh-GELU MLP, learned positions, output head tied to the token embedding). Parameter names are
ours; `finetune.formats.loading` maps the Hugging Face and book layouts onto them.

Module names used elsewhere (LoRA targets): `blocks.N.attn.qkv`, `blocks.N.attn.proj`,
`blocks.N.mlp.fc`, `blocks.N.mlp.proj`, `lm_head`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finetune.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise UserError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown GPTConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),  # 1558M
    # Full GPT-2 vocabulary (so the real tokenizer works) but tiny everywhere else: tests, offline demos.
    "gpt2-tiny": dict(n_embd=64, n_layer=2, n_head=4, context_length=256),
}


class KVCache:
    """Keys and values of every layer for positions already seen, preallocated for `max_len`.

    Allocated at the first update, in the dtype of the keys and values it receives: under autocast
    they are bf16/fp16 beside fp32 weights, and a cache in the weights' dtype would take twice the
    memory and a cast per layer per token."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int) -> None:
        head_dim = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of `layer`; return all keys and values up to them."""
        if self.k is None or self.v is None:
            self.k = k.new_empty(self.shape)
            self.v = v.new_empty(self.shape)
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@dataclass(frozen=True)
class Segments:
    """Packed rows (several sequences end to end, finetune.data.packing): where each row's sequences end.
    Attention runs causally inside each sequence and never across: the cost of the sequences' own lengths,
    not of the whole row's, and no mask to build."""

    ends: tuple[tuple[int, ...], ...]  # per row, the end of each run of equal segment ids (the last: the row's)

    @classmethod
    def of(cls, segments: torch.Tensor) -> Segments:
        """From `(B, T)` segment ids, each sequence one contiguous run (padding: a run of its own)."""
        changes = (segments[:, 1:] != segments[:, :-1]).tolist()
        T = segments.shape[1]
        return cls(tuple((*(t + 1 for t, changed in enumerate(row) if changed), T) for row in changes))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(mask, Segments):
            y = self._per_segment(q, k, v, mask)
            return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        # mask=None means plain causal attention over a fresh sequence (the fast fused path), or a
        # single new position per sequence attending to everything cached before it.
        is_causal = mask is None and k.shape[2] == T and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def _per_segment(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Causal attention `(B, heads, T, D)` inside each packed sequence, one fused call per sequence."""
        dropout = self.dropout if self.training else 0.0
        rows = []
        for b, ends in enumerate(segments.ends):
            starts = (0, *ends[:-1])
            parts = [
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], dropout_p=dropout, is_causal=True
                )
                for s, e in zip(starts, ends, strict=True)
            ]
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)

    def forward_at(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The attention output `(B, C)` at one position per row: keys and values of every position up
        to it, a query only there."""
        B, T, C = x.shape
        D = C // self.n_head
        qkv = self.qkv(x)
        q = qkv[torch.arange(B, device=x.device), index, :C].view(B, self.n_head, 1, D)
        k, v = (t.view(B, T, self.n_head, D).transpose(1, 2) for t in qkv[..., C:].split(C, dim=2))
        visible = (torch.arange(T, device=x.device) <= index[:, None]).view(B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.view(B, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The block's output `(B, C)` at position `index[b]` of each row, for a reader of one position
        (a classifier): the MLP and most of attention run on B positions instead of B×T."""
        at = x[torch.arange(x.shape[0], device=x.device), index]
        at = at + self.attn.forward_at(self.ln_1(x), index)
        return at + self.mlp(self.ln_2(at))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Where the caller builds (a `with torch.device(...)` block, meta included). A factory call tells
        # on every torch release; torch.get_default_device ignores that block before torch 2.8.
        device = torch.empty(0).device
        with torch.device("meta"):  # allocated here, initialised once below (not by nn's defaults first)
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.wpe = nn.Embedding(config.context_length, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.tie_weights()
        # Training setting, not architecture (never saved): recompute each block's activations in the
        # backward pass instead of keeping them (`train.activation_checkpointing`).
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Re-tie the head to the token embedding (after assigning loaded tensors)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def checkpoint_meta(self) -> dict:
        """What config.json records to rebuild this model (see finetune.checkpoints.atomic)."""
        return {"task": "lm", "model": self.config.to_dict()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once each (the tied head is the embedding)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits `(B, T, vocab)`, or the final hidden states `(B, T, n_embd)` with `return_hidden`.

        attention_mask: `(B, S)` with 1 for real and 0 for padding tokens, S covering the cached
        positions plus `idx`. positions: `(B, T)` position ids (default: consecutive after the cache).
        segments: `(B, T)` for rows that hold several sequences end to end (packing): a token attends
        only to earlier tokens of its own segment; give each sequence's `positions` from 0.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context_length:
            raise UserError(
                f"sequence of {past + T} tokens exceeds the model's context length {self.config.context_length}"
            )
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device).unsqueeze(0)
        x = self.embed(idx, positions)
        mask: torch.Tensor | Segments | None = None
        if attention_mask is not None:
            mask = _attention_mask(attention_mask, past, T)
        if segments is not None:
            mask = Segments.of(segments)
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    def run_block(
        self,
        block: nn.Module,
        x: torch.Tensor,
        mask: torch.Tensor | Segments | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """`block(x)`; with activation checkpointing while training, only its input is kept and the block
        runs again in the backward pass (dropout replays the same random numbers; torch's non-reentrant
        form, so frozen inputs still pass gradients to adapters inside)."""
        if self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(block, x, mask, use_reentrant=False)
        return block(x, mask, cache, layer)

    def embed(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream entering the first block: token plus position embeddings."""
        if positions is None:
            if idx.shape[1] > self.config.context_length:
                raise UserError(
                    f"sequence of {idx.shape[1]} tokens exceeds the model's context length {self.config.context_length}"
                )
            positions = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
        return self.drop(self.wte(idx) + self.wpe(positions))


def _attention_mask(key_mask: torch.Tensor, past: int, T: int) -> torch.Tensor:
    """Boolean `(B, 1, T, S)` mask: causal, padding keys hidden.

    A padding query would have no key left to attend to (a NaN row), so every query may always see
    itself; outputs at padding positions are never used.
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=key_mask.device).unsqueeze(1)
    k_pos = torch.arange(S, device=key_mask.device).unsqueeze(0)
    causal = k_pos <= q_pos
    mask = causal & key_mask.bool()[:, None, :] | (k_pos == q_pos)
    return mask.unsqueeze(1)
