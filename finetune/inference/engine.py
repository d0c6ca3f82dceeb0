"""Decoding for many requests at once: requests that arrive together are prefilled together, and every
active request advances one token per step in one batched forward pass with a shared KV cache.

Each request owns a slot (a row of the cache). Rows are right-aligned at a shared write position `W`:
row i holds its tokens at cache positions `[start_i, W)`, is masked everywhere else, and reads its own
position ids, so a request computes what it would compute alone. A request that joins later is
prefilled on its own rows and copied in ending at `W`; finished or cancelled requests free their slot
at the next step. The engine runs in one thread; callers submit from any thread and receive events
through the callback they pass.

Every cache position a row does not own is zero, never memory left by earlier allocations: the mask
gives those positions weight 0, but attention still multiplies them, and `0 * NaN` is NaN (recycled
memory can hold NaNs, or denormals that make every step many times slower). If the thread itself
dies, the engine says so (`failure`), ends every request with an error and refuses new ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finetune.inference.generate import filter_logits, is_greedy, sample
from finetune.model.gpt import GPT, KVCache
from finetune.model.tokenizer import EOT_ID

log = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The decoding thread has ended (closed, or died of the failure named in the message)."""


@dataclass
class TokenScore:
    """A token, its log-probability under the model, and the `top` most likely tokens there."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None = None


@dataclass
class Event:
    kind: str  # "prompt" (scores of the prompt tokens), "token", "done" or "error"
    scores: list[TokenScore] = field(default_factory=list)
    finish_reason: str | None = None  # with "done": "stop" (end of text, or cancelled) or "length"
    message: str | None = None  # with "error"


@dataclass(eq=False)
class Request:
    """One prompt to continue. `logprobs`: how many alternatives to report per token (None: no scores);
    `score_prompt`: also report the prompt tokens' scores (OpenAI's echo + logprobs)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    score_prompt: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (a stop string was reached, or the client left); the slot frees at the next step."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    slot: int
    start: int
    last: int
    generated: int
    generator: torch.Generator


class Engine:
    def __init__(self, model: GPT, max_batch: int = 8) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._pending: deque[Request] = deque()
        self._admitted: list[Request] = []  # taken from the queue for this turn, not yet holding a slot
        self._rows: list[_Row] = []
        self._wake = threading.Condition()
        self._closed = False
        c = model.config
        empty = (c.n_layer, max_batch, c.n_head, 0, c.n_embd // c.n_head)  # (layers, slots, heads, capacity, head_dim)
        self._k = torch.zeros(empty, dtype=self.dtype, device=self.device)
        self._v = torch.zeros(empty, dtype=self.dtype, device=self.device)
        self._write = 0  # W: the cache position the next step writes
        self.largest_batch = 0  # the most requests one step has decoded together
        self.tokens_generated = 0
        self.last_step = time.monotonic()  # when the loop last made progress (or last went idle)
        self.failure: str | None = None  # why the thread died, once it has
        self._thread = threading.Thread(target=self._run, name="finetune-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; EngineStopped if the decoding thread has ended."""
        with self._wake:
            if self._closed or self.failure is not None:
                raise EngineStopped(self.failure or "the engine is closed")
            self._pending.append(request)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    @property
    def active(self) -> int:
        """Requests holding a slot (a test and the page read it; no lock needed for a count)."""
        return len(self._rows)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def health(self) -> dict:
        """What a watchdog needs: a stalled engine has work (`active`) and an old `last_step_age_s`."""
        return {
            "alive": self.alive,
            "active": self.active,
            "pending": len(self._pending),
            "last_step_age_s": round(time.monotonic() - self.last_step, 3),
            "largest_batch": self.largest_batch,
            "tokens_generated": self.tokens_generated,
            "failure": self.failure,
        }

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: the loop, and if anything escapes it, a failure every caller hears of."""
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as e:
            log.exception("finetune engine: the decoding thread died")
            with self._wake:
                self.failure = f"{type(e).__name__}: {e}"
                held = [row.request for row in self._rows]
                ended = held + [r for r in self._admitted if r not in held] + list(self._pending)
                self._rows, self._write = [], 0
                self._pending.clear()
            for request in ended:
                request.emit(Event("error", message=f"the engine stopped ({self.failure})"))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows:
                    self.last_step = time.monotonic()  # idle is not stalled
                    self._wake.wait()
                if self._closed:
                    return
                free = self.max_batch - len(self._rows)
                self._admitted = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            self._serve(self._admitted)
            self._admitted = []
            self.last_step = time.monotonic()

    def _serve(self, admitted: list[Request]) -> None:
        """One turn of the loop: drop cancelled rows, prefill the admitted requests, decode one step."""
        try:
            self._drop_cancelled()
            for request in [r for r in admitted if r.cancelled]:  # the client left while it waited
                request.emit(Event("done", finish_reason="stop"))
            admitted = [r for r in admitted if not r.cancelled]
            if admitted:
                self._prefill(admitted)
            if self._rows:
                self._step()
        except Exception as e:  # a failure ends the requests in flight, never the server
            for row in self._rows:
                row.request.emit(Event("error", message=f"{type(e).__name__}: {e}"))
            for request in admitted:
                request.emit(Event("error", message=f"{type(e).__name__}: {e}"))
            self._rows, self._write = [], 0

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.request.cancelled]:
            self._finish(row, "stop")

    def _finish(self, row: _Row, reason: str) -> None:
        self._rows.remove(row)
        row.request.emit(Event("done", finish_reason=reason))
        if not self._rows:
            self._write = 0

    # -- prefill: new requests, together -----------------------------------------------------------

    def _prefill(self, requests: list[Request]) -> None:
        prompts = [r.prompt for r in requests]
        T = max(map(len, prompts))
        tokens = torch.tensor([[EOT_ID] * (T - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = KVCache(self.model.config, len(prompts), T)
        padded = bool((mask == 0).any())
        hidden = self.model(
            tokens, attention_mask=mask if padded else None, positions=positions, cache=cache, return_hidden=True
        )
        last = self.model.lm_head(hidden[:, -1]).float()
        for i, request in enumerate(requests):
            if request.score_prompt:
                p = len(request.prompt)
                logits = self.model.lm_head(hidden[i, T - p : -1]).float()
                scores = [TokenScore(request.prompt[0], None)] + self._scores(
                    logits, request.prompt[1:], request.logprobs
                )
                request.emit(Event("prompt", scores=scores))
            if request.max_tokens == 0:
                request.emit(Event("done", finish_reason="length"))
                continue
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(2**62, ()).item()))
            token = self._choose(last[i], request, generator)
            row = _Row(request, self._free_slot(), 0, token, 1, generator)
            if self._emit_token(row, last[i]):
                self._place(row, cache, i, T)

    def _free_slot(self) -> int:
        used = {row.slot for row in self._rows}
        return next(s for s in range(self.max_batch) if s not in used)

    def _place(self, row: _Row, cache: KVCache, i: int, T: int) -> None:
        """Copy a prefilled prompt into its slot, ending at the write position."""
        p = len(row.request.prompt)
        if self._write < p:  # move everyone right to make room for a longer prompt
            self._ensure(p)
            self._shift(p - self._write)
        self._ensure(self._write)
        row.start = self._write - p
        assert cache.k is not None and cache.v is not None, "the prefill filled the cache"
        for buffer, prefilled in ((self._k, cache.k), (self._v, cache.v)):
            buffer[:, row.slot, :, : row.start] = 0  # what the slot's last owner left
            buffer[:, row.slot, :, row.start : self._write] = prefilled[:, i, :, T - p : T]
        self._rows.append(row)

    def _shift(self, by: int) -> None:
        """Move every slot's filled positions `by` places (right if positive; the capacity must allow it),
        zeroing the positions they leave."""
        W = self._write
        vacated = slice(0, by) if by > 0 else slice(W + by, W)
        for buffer in (self._k, self._v):
            buffer[:, :, :, max(by, 0) : W + by] = buffer[:, :, :, max(-by, 0) : W].clone()
            buffer[:, :, :, vacated] = 0
        for row in self._rows:
            row.start += by
        self._write += by

    def _ensure(self, length: int) -> None:
        """Room for `length` positions in every slot: the cache grows in steps of 128, up to the context."""
        capacity = self._k.shape[3]
        if length <= capacity:
            return
        c = self.model.config
        new = min(c.context_length, max(length, capacity * 2, 128))
        shape = (c.n_layer, self.max_batch, c.n_head, new, c.n_embd // c.n_head)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        k[:, :, :, : self._write] = self._k[:, :, :, : self._write]
        v[:, :, :, : self._write] = self._v[:, :, :, : self._write]
        self._k, self._v = k, v

    # -- one decoding step for every active request ----------------------------------------------

    def _step(self) -> None:
        if self._write == self.model.config.context_length:  # the shared buffer is full: drop the unused left part
            self._shift(-min(row.start for row in self._rows))
        self._ensure(self._write + 1)
        n = max(row.slot for row in self._rows) + 1
        W = self._write
        self.largest_batch = max(self.largest_batch, len(self._rows))
        tokens = torch.full((n, 1), EOT_ID, device=self.device)
        positions = torch.zeros((n, 1), dtype=torch.long, device=self.device)
        keys = torch.zeros((n, W + 1), dtype=torch.long, device=self.device)
        for row in self._rows:
            tokens[row.slot, 0] = row.last
            positions[row.slot, 0] = W - row.start
            keys[row.slot, row.start :] = 1
        cache = KVCache(self.model.config, n, W + 1)
        cache.k, cache.v, cache.length = self._k[:, :n], self._v[:, :n], W
        hidden = self.model(tokens, attention_mask=keys, positions=positions, cache=cache, return_hidden=True)
        logits = self.model.lm_head(hidden[:, -1]).float()
        self._write = W + 1
        for row in list(self._rows):
            if row.request.cancelled:
                self._finish(row, "stop")
                continue
            row.last = self._choose(logits[row.slot], row.request, row.generator)
            row.generated += 1
            if not self._emit_token(row, logits[row.slot]):
                self._rows.remove(row)
                if not self._rows:
                    self._write = 0

    def _emit_token(self, row: _Row, logits: torch.Tensor) -> bool:
        """Report the row's new token; False when the request is complete (its done event sent)."""
        request = row.request
        self.tokens_generated += 1
        score = (
            self._scores(logits[None], [row.last], request.logprobs)[0]
            if request.logprobs is not None
            else TokenScore(row.last, None)
        )
        request.emit(Event("token", scores=[score]))
        if row.last == EOT_ID or row.generated >= request.max_tokens:
            request.emit(Event("done", finish_reason="stop" if row.last == EOT_ID else "length"))
            return False
        return True

    @staticmethod
    def _choose(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
        if is_greedy(request.temperature):
            return int(logits.argmax())
        probs = filter_logits(logits[None], request.temperature, None, request.top_p).softmax(-1)
        return int(sample(probs, generator))

    @staticmethod
    def _scores(logits: torch.Tensor, tokens: list[int], top: int | None) -> list[TokenScore]:
        """Log-probabilities of `tokens` under `logits` (one row per token), with the `top` best of each row."""
        if not tokens:
            return []
        logprobs = logits.float().log_softmax(-1)
        chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        if not top:
            return [TokenScore(t, lp, [] if top == 0 else None) for t, lp in zip(tokens, chosen, strict=True)]
        best = logprobs.topk(top, dim=-1)
        return [
            TokenScore(t, lp, list(zip(ids, values, strict=True)))
            for t, lp, ids, values in zip(tokens, chosen, best.indices.tolist(), best.values.tolist(), strict=True)
        ]
