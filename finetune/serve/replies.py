"""How engine events become OpenAI replies: whole characters of text cut at stop strings, completion
logprobs, usage, and streamed chunks (server-sent events) that hold back what a stop string may claim."""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from finetune.inference.engine import Engine, EngineStopped, Event, TokenScore
from finetune.inference.engine import Request as Generation
from finetune.model.tokenizer import EOT_ID, get_tokenizer
from finetune.serve.protocol import APIError


class Run:
    """The engine requests of one HTTP request (one per prompt), their events on one queue."""

    def __init__(self, engine: Engine, prompts: list[list[int]], max_tokens: int, body, logprobs, score_prompt) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.prompt_tokens = sum(map(len, prompts))
        self.completion_tokens = 0
        self.requests = []
        for i, prompt in enumerate(prompts):
            emit = functools.partial(self._emit, loop, i)
            seed = None if body.seed is None else (body.seed + i) % 2**63  # each prompt its own stream, reproducibly
            self.requests.append(
                Generation(prompt, max_tokens, emit, body.temperature, body.top_p, seed, logprobs, score_prompt)
            )
        try:
            for request in self.requests:
                engine.submit(request)
        except EngineStopped as e:
            self.cancel()
            raise APIError(
                503, f"the model cannot answer: its decoding thread stopped ({e}); restart finetune serve"
            ) from e

    def _emit(self, loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:
        """Called in the engine's thread: hand the event to the request's event loop. A loop already closed
        (the server stopping while a request decodes) has no one left to tell."""
        try:
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:  # "Event loop is closed"
            if not loop.is_closed():
                raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event until each request is done; stops the rest when the consumer goes away."""
        open_ = set(range(len(self.requests)))
        try:
            while open_:
                i, event = await self.queue.get()
                if event.kind == "token":
                    self.completion_tokens += 1
                if event.kind == "error":
                    raise APIError(500, f"generation failed: {event.message}")
                if event.kind == "done":
                    open_.discard(i)
                yield i, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop every request of this run; their places free at the engine's next step."""
        for request in self.requests:
            request.cancel()

    async def collect(self, choices, receive) -> bool:
        """Every event into `choices`; False, with the requests cancelled, if the client leaves first
        (`receive`: the ASGI channel, which says `http.disconnect` when it does)."""

        async def gather() -> None:
            async for i, event in self.events():
                if choices[i].add(event):
                    self.requests[i].cancel()  # a stop string: no more tokens wanted

        collecting, leaving = asyncio.ensure_future(gather()), asyncio.ensure_future(_left(receive))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this call itself is cancelled
            collecting.cancel()
            leaving.cancel()
            self.cancel()
        if not collecting.done() or collecting.cancelled():
            return False
        collecting.result()  # an engine error, as the APIError it became
        return True

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class _Text:
    """Generated tokens to text: whole UTF-8 characters only, cut before the first stop string, and
    streamed holding back what could still become a stop string."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = stops or []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> None:
        if self.stopped or token == EOT_ID:
            return
        self.text += self.decoder.decode(get_tokenizer().decode_single_token_bytes(token))
        self._cut()

    def finish(self) -> None:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
            self._cut()

    def _cut(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def release(self, final: bool = False) -> str:
        """Text not yet sent that no stop string can still claim."""
        hold = 0 if final or self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece


class Completion:
    """One choice of a completion: text, finish reason and (when asked) OpenAI's completion logprobs."""

    def __init__(self, index: int, prompt_text: str, echo: bool, stops, logprobs: int | None) -> None:
        self.index, self.logprobs = index, logprobs
        self.echo_text = prompt_text if echo else ""
        self.offset = 0 if echo else len(prompt_text)  # text_offset of the next token reported
        self.text = _Text(stops)
        self.scores: list[TokenScore] = []  # of the echoed prompt, then of the generated tokens
        self.reported = 0  # scores already sent (streaming)
        self.finish_reason: str | None = None

    def add(self, event: Event) -> bool:
        """Take an event; True when a stop string has just ended the text."""
        if event.kind == "prompt":
            self.scores += event.scores
        elif event.kind == "token":
            token = event.scores[0]
            if not self.text.stopped and token.token != EOT_ID:
                self.scores.append(token)
            self.text.add(token.token)
        elif event.kind == "done":
            self.text.finish()
            self.finish_reason = "stop" if self.text.stopped else event.finish_reason
        return self.text.stopped and self.finish_reason is None

    def final(self) -> dict:
        return {
            "text": self.echo_text + self.text.text,
            "index": self.index,
            "logprobs": self._logprobs(self.scores),
            "finish_reason": self.finish_reason,
        }

    def chunks(self) -> list[dict]:
        """The streamed chunk for what arrived since the last one, if anything did."""
        text = self.echo_text + self.text.release(final=self.finish_reason is not None)
        self.echo_text = ""
        new, self.reported = self.scores[self.reported :], len(self.scores)
        if not text and not new and self.finish_reason is None:
            return []
        return [
            {"text": text, "index": self.index, "logprobs": self._logprobs(new), "finish_reason": self.finish_reason}
        ]

    def _logprobs(self, scores) -> dict | None:
        if self.logprobs is None:
            return None
        tokens, starts = [_piece(s.token) for s in scores], []
        for piece in tokens:
            starts.append(self.offset)
            self.offset += len(piece)
        return {
            "tokens": tokens,
            "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [None if s.top is None else {_piece(t): lp for t, lp in s.top} for s in scores],
            "text_offset": starts,
        }


class ChatChoice:
    """The one choice of a chat completion. An instruct run's reply is stripped, as `finetune respond` does."""

    def __init__(self, stops, strip: bool) -> None:
        self.text, self.strip = _Text(stops), strip
        self.finish_reason: str | None = None
        self.started = False  # streamed: the reply begins at its first non-blank text

    def add(self, event: Event) -> bool:
        if event.kind == "token":
            self.text.add(event.scores[0].token)
        elif event.kind == "done":
            self.text.finish()
            self.finish_reason = "stop" if self.text.stopped else event.finish_reason
        return self.text.stopped and self.finish_reason is None

    def final(self) -> dict:
        content = self.text.text.strip() if self.strip else self.text.text
        return {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": self.finish_reason}

    def first_chunk(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def chunks(self) -> list[dict]:
        text = self.text.release(final=self.finish_reason is not None)
        if self.strip and not self.started:
            text = text.lstrip()
            self.started = bool(text)
        out = [{"index": 0, "delta": {"content": text}, "finish_reason": None}] if text else []
        if self.finish_reason is not None:
            out.append({"index": 0, "delta": {}, "finish_reason": self.finish_reason})
        return out


async def _left(receive) -> None:
    """Return when the client has gone (the request's body was read before: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _piece(token: int) -> str:
    return get_tokenizer().decode_single_token_bytes(token).decode("utf-8", errors="replace")


def stream_reply(run: Run, choices: list, reply: dict, usage: bool | None) -> StreamingResponse:
    """Server-sent events in OpenAI's streaming shape, ending with `data: [DONE]`."""

    def line(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def stream() -> AsyncIterator[str]:
        if hasattr(choices[0], "first_chunk"):  # chat: the role arrives first, as OpenAI sends it
            yield line({**reply, "choices": [choices[0].first_chunk()]})
        try:
            async for i, event in run.events():
                if choices[i].add(event):
                    run.requests[i].cancel()
                for piece in choices[i].chunks():
                    yield line({**reply, "choices": [piece]})
        except APIError as e:
            yield line(e.body())
            return
        if usage:
            yield line({**reply, "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"

    return _RunStream(run, stream())


class _RunStream(StreamingResponse):
    """Server-sent events that cancel their run when the response ends, however it ends: a client that
    leaves mid-stream must free its place now, not when the abandoned generator is garbage-collected."""

    def __init__(self, run: Run, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()
