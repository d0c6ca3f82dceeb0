"""`finetune serve`: one model behind OpenAI's HTTP API, and a page to try it at `/`.

FastAPI (request validation, OpenAPI docs at /docs) on uvicorn. Language models answer
`/v1/completions` and `/v1/chat/completions`, streamed as server-sent events on request, decoded
together in batches by `finetune.inference.engine`; classifiers answer `/v1/classify`. Every error is OpenAI's
JSON error shape with a 4xx status naming the field, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.checkpoints.interface import REWARD
from finetune.data.jinja_templates import CannotExpress
from finetune.data.prompts import can_converse, stop_strings
from finetune.errors import UserError
from finetune.inference.engine import Engine
from finetune.inference.loading import Loaded, load_for_use
from finetune.inference.predict import exchanges, predict
from finetune.inference.respond import conversation_tokens
from finetune.model.classifier import GPTClassifier
from finetune.model.gpt import GPT
from finetune.model.tokenizer import encode, get_tokenizer
from finetune.serve.protocol import (
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    Exchange,
)
from finetune.serve.replies import ChatChoice, Completion, Run, stream_reply

GRACE_SECONDS = 3  # after Ctrl-C, replies in flight get this long to finish
MAX_BODY = 1 << 20  # bytes; a request body beyond it is refused with 413
MAX_TEXTS = 256  # texts per classification request
CLIENT_LEFT = 499  # the status logged for a request whose client left before its reply (nginx's convention)


def create_app(
    served: Loaded, api_key: str | None = None, max_batch: int = 8, allowed_hosts: Sequence[str] | None = ()
):
    """The ASGI application: FastAPI's routes inside a request-body size limit and a Host check.
    `allowed_hosts`: the names accepted besides loopback ones; None accepts any."""
    engine = Engine(served.model, max_batch) if isinstance(served.model, GPT) else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if engine is not None:
            engine.close()

    app = FastAPI(title=f"finetune: {served.name}", lifespan=lifespan)
    app.state.engine = engine
    classify_lock = threading.Lock()
    created = int(time.time())
    gpt = served.model.gpt if isinstance(served.model, GPTClassifier) else served.model
    context, vocab = gpt.config.context_length, gpt.config.vocab_size

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    guarded = [Depends(authorized)]

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first["type"] == "json_invalid":
            return JSONResponse(
                APIError(400, f"malformed JSON body ({first.get('ctx', {}).get('error', first['msg'])})").body(), 400
            )
        param = ".".join(loc) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        return JSONResponse(APIError(400, f"{param or 'body'}: {message}", param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = (
            f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        )
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (files("finetune") / "assets" / "serve" / "index.html").read_text(encoding="utf-8")

    @app.get("/health", dependencies=guarded)
    async def health() -> JSONResponse:
        """200 while the model can answer; 503 (with the cause) once the decoding thread has died.
        `last_step_age_s` with `active` > 0 growing is a stalled engine; `tokens_generated` growing for a
        request whose client left is a lost cancel."""
        if engine is None:
            return JSONResponse({"status": "ok", "model": served.name, "task": "classification"})
        state = engine.health()
        return JSONResponse(
            {"status": "ok" if state["alive"] else "error", "model": served.name, **state},
            status_code=200 if state["alive"] else 503,
        )

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        card = {
            "id": served.name,
            "object": "model",
            "created": created,
            "owned_by": "finetune",
            "task": "text-classification" if served.classifier else "text-generation",
            "context_length": context,
            "prompt_style": served.interface.prompt_style,  # null: messages are continued as text
            "multi_turn": served.interface.prompt_style is not None and can_converse(served.interface.prompt_style),
        }
        if served.classifier:
            card |= {"labels": served.meta["labels"], "problem_type": served.interface.problem_type}
            if "thresholds" in served.meta:
                card["thresholds"] = dict(zip(served.meta["labels"], served.meta["thresholds"], strict=True))
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        lm = language_model_only()
        sampling_defaults(body)
        prompts = _prompts(body.prompt, vocab)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: must be >= 1 (0 only with echo=true, to score the prompt)", "max_tokens")
        for tokens, _ in prompts:
            _fits(tokens, max_tokens, context)
        run = Run(
            lm,
            [tokens for tokens, _ in prompts],
            max_tokens,
            body,
            body.logprobs,
            body.echo and body.logprobs is not None,
        )
        choices = [Completion(i, text, body.echo, body.stops, body.logprobs) for i, (_, text) in enumerate(prompts)]
        reply = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served.name,
        }
        if body.stream:
            return stream_reply(run, choices, reply, body.include_usage)
        if not await run.collect(choices, request.receive):
            return Response(status_code=CLIENT_LEFT)
        return {**reply, "choices": [c.final() for c in choices], "usage": run.usage()}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: Request):
        lm = language_model_only()
        sampling_defaults(body)
        instruct = served.interface.instruct
        tokens = _chat_prompt(body, served.interface.prompt_style)
        limit = body.max_completion_tokens or body.max_tokens
        reply_tokens = served.interface.generation.max_new_tokens if "generation" in served.meta else context
        max_tokens = limit if limit is not None else min(reply_tokens, context - len(tokens))
        _fits(tokens, max_tokens, context, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        run = Run(lm, [tokens], max_tokens, body, None, False)
        model_stops = [*served.interface.generation.stop, *stop_strings(served.interface.prompt_style)]
        stops = body.stops + [s for s in dict.fromkeys(model_stops) if s not in body.stops]
        choice = ChatChoice(stops, strip=instruct)
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served.name,
        }
        if body.stream:
            return stream_reply(
                run,
                [choice],
                {**reply, "object": "chat.completion.chunk"},
                body.include_usage,
            )
        if not await run.collect([choice], request.receive):
            return Response(status_code=CLIENT_LEFT)
        return {**reply, "choices": [choice.final()], "usage": run.usage()}

    @app.post("/v1/classify", dependencies=guarded)
    async def classify(body: ClassifyRequest) -> dict:
        if not served.classifier:
            raise APIError(
                400, f"model: {served.name} is a language model; use /v1/completions or /v1/chat/completions", "model"
            )
        items = [body.input] if isinstance(body.input, str) else body.input
        if len(items) > MAX_TEXTS:
            raise APIError(400, f"input: {len(items)} texts, at most {MAX_TEXTS} per request", "input")
        exchanged = [item for item in items if isinstance(item, Exchange)]
        if exchanged and served.interface.problem_type != REWARD:
            raise APIError(
                400, "input: objects with instruction and response are for reward models; send texts", "input"
            )
        texts = [item for item in items if isinstance(item, str)] or exchanges(
            served.meta,
            [e.instruction for e in exchanged],
            [e.input for e in exchanged],
            [e.response for e in exchanged],
        )
        for i, text in enumerate(texts):
            if not text.strip():
                raise APIError(400, f"input[{i}]: empty text", "input")

        def run():
            with classify_lock:  # one batch at a time: predict() batches the texts of a request itself
                return predict(served.classifier_model, served.meta, texts)

        predictions = await run_in_threadpool(run)
        data = [{"index": i, **answer} for i, answer in enumerate(predictions.answers())]
        return {"object": "list", "model": served.name, "data": data}

    def sampling_defaults(body) -> None:
        """Settings a request leaves out are the model's generation defaults (as vLLM does), else OpenAI's."""
        stored = "generation" in served.meta
        defaults = served.interface.generation
        if body.temperature is None:
            body.temperature = defaults.temperature if stored else 1.0
        if body.top_p is None:
            body.top_p = (defaults.top_p or 1.0) if stored else 1.0

    def language_model_only() -> Engine:
        """The engine of a language model; a classifier is answered with a 400."""
        if engine is None:
            raise APIError(400, f"model: {served.name} is a classifier; use POST /v1/classify", "model")
        return engine

    outer = _BodyLimit(_HostCheck(app, allowed_hosts), MAX_BODY)
    outer.state = app.state  # the engine, for serve() and tests
    return outer


# -- prompts ---------------------------------------------------------------------------------------


def _prompts(prompt, vocab: int) -> list[tuple[list[int], str]]:
    """Token ids and text of each prompt: a string, strings, token ids, or lists of token ids."""
    tokenizer = get_tokenizer()
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt: empty list", "prompt")
    out = []
    for i, item in enumerate(items):
        tokens = encode(item) if isinstance(item, str) else list(item)
        if not tokens:
            raise APIError(400, f"prompt{'' if len(items) == 1 else f'[{i}]'}: empty", "prompt")
        if any(not 0 <= t < vocab for t in tokens):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        out.append((tokens, item if isinstance(item, str) else tokenizer.decode(tokens)))
    return out


def _fits(tokens: list[int], max_tokens: int, context: int, field: str = "max_tokens") -> None:
    if len(tokens) > context - (1 if max_tokens else 0):
        raise APIError(
            400, f"prompt: {len(tokens)} tokens, more than the model's context of {context} allows", "prompt"
        )
    if len(tokens) + max_tokens > context:
        raise APIError(
            400,
            f"{field}: the prompt's {len(tokens)} tokens + {field}={max_tokens} exceed the model's "
            f"context of {context}; at most {context - len(tokens)}",
            field,
        )


def _chat_prompt(body: ChatRequest, style: str | None) -> list[int]:
    """The whole conversation in the model's chat format (a `developer` message is a system one), ending with the
    generation prompt of the assistant's turn; for a model trained on no style, one user message, continued as
    text. What the format cannot hold is a 400 that says why, never a message dropped."""
    messages = body.messages
    if messages[-1].role != "user" or not messages[-1].text().strip():
        raise APIError(400, "messages: the last message must be the user's, with text", "messages")
    if style is None:
        if len(messages) > 1:
            raise APIError(
                400,
                "messages: this model has no chat format (it continues text); send one user message, or serve it "
                "with --prompt-style",
                "messages",
            )
        return encode(messages[0].text())
    conversation = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content if isinstance(m.content, str) else [part.model_dump() for part in m.content],
        }
        for m in messages
    ]
    try:
        return conversation_tokens(conversation, style)
    except CannotExpress as e:
        message = f"messages: the model's chat format cannot hold this conversation: {e}"
        raise APIError(400, message, "messages") from None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost and *.localhost (which RFC 6761 keeps on this machine)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost" or host.lower().endswith(".localhost")


def _host_name(value: str) -> str:
    """The host of a Host header or an Origin URL, without port or brackets."""
    value = value.split("://", 1)[-1].split("/", 1)[0]
    if value.startswith("["):
        return value[1 : value.find("]")]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _HostCheck:
    """Refuse (403) a request whose Host or Origin names another machine. A web page can reach a server on
    127.0.0.1 through DNS rebinding (its own name resolved to 127.0.0.1), and then its requests carry that
    name; Ollama refuses them the same way. `allowed`: names accepted besides loopback ones; None: any."""

    def __init__(self, app, allowed: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed is None or "*" in allowed else {name.lower() for name in allowed}

    def _refused(self, value: str | None) -> bool:
        if value is None or value == "null" or self.allowed is None:
            return False
        host = _host_name(value)
        return not is_loopback(host) and host.lower() not in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in (b"host", b"origin")}
            for header in ("host", "origin"):
                if self._refused(headers.get(header)):
                    message = (
                        f"{header} {headers[header]!r} is not this machine; a server on a loopback address answers "
                        f"only loopback names: start it with --allow-host {_host_name(headers[header])} to accept it"
                    )
                    return await _send_error(send, APIError(403, message, header))
        await self.app(scope, receive, send)


async def _send_error(send, error: APIError) -> None:
    """An OpenAI error reply, sent from outside FastAPI."""
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether announced (Content-Length) or sent in
    chunks: the body is read here, up to the limit, and handed to the app in one piece."""

    state: Any = None  # the app's state (its engine), for serve() and tests

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(receive, send, more=True)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(receive, send, more)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client leaving, which a stream listens for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, receive, send, more: bool) -> None:
        """413, after reading (and dropping) the rest of a body of up to 16 times the limit: a client that
        sends its whole body before reading the reply (urllib, requests) then sees the 413, not a broken pipe."""
        dropped = 0
        while more and dropped < 16 * self.limit:
            message = await receive()
            dropped += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        await _send_error(send, APIError(413, f"request body over {self.limit} bytes"))


def serve(
    name: str,
    init: str,
    host: str,
    port: int,
    api_key: str | None,
    bf16: bool,
    max_batch: int,
    prompt_style: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> None:
    """Load the model and serve it until interrupted. Bound to a loopback address it answers loopback
    names and `allow_hosts` only; bound to another address, any name unless `allow_hosts` lists some."""
    import socket

    import uvicorn

    with socket.socket() as probe:  # a clear error for a busy port, before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from e
    served = load_for_use(name, init, bf16, prompt_style)  # with its interface: chat is prompted in its style
    hosts = list(allow_hosts) if allow_hosts or is_loopback(host) else None
    app = create_app(served, api_key, max_batch, hosts)
    kind = "classifier" if served.classifier else "language model"
    print(
        f"finetune: serving {served.name} ({kind}) at http://{host}:{port}/ (OpenAI API under /v1); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    # Ctrl-C lets replies in flight finish for a few seconds, then ends them; the tasks that stopping
    # cancels are not errors, so their tracebacks are not printed.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_SECONDS)
    logging.getLogger("uvicorn.error").addFilter(_not_a_shutdown)
    # uvicorn handles Ctrl-C itself, then hands the signal back to the handler it found: make that Python's,
    # so the command ends with "interrupted" and status 130 even when started with SIGINT ignored (`nohup`,
    # or `&` in a script), where the signal would otherwise vanish and the server exit 0.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        uvicorn.Server(config).run()
    finally:  # a second Ctrl-C skips the app's shutdown: the decoding thread still has to end
        if app.state.engine is not None:
            app.state.engine.close()


def _not_a_shutdown(record: logging.LogRecord) -> bool:
    """False for the record of a task cancelled (or interrupted) because the server is stopping: logged with
    the exception, or (the lifespan's "shutdown failed") with its traceback as the message."""
    error = record.exc_info[0] if record.exc_info else None
    if error and issubclass(error, (asyncio.CancelledError, KeyboardInterrupt)):
        return False
    return not str(record.msg).rstrip().endswith(("CancelledError", "KeyboardInterrupt"))
