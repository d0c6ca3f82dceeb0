"""The OpenAI HTTP API's request bodies and error shape, as far as `finetune serve` honours them.

Unknown fields, wrong types and settings this server cannot honour (n > 1, penalties, logit_bias) are
refused with a 400 naming the field, in OpenAI's error format, rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI allows 4 stop strings; clients of other servers send more (lm-evaluation-harness: its task's
# strings plus end-of-text), so we take as many as a request is likely to need.
MAX_STOPS = 16


class APIError(Exception):
    """An error a client gets as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = Field(None, description="ignored: the server holds one model")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default: the model's, else 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default: the model's, else 1")
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="a 64-bit signed seed, as PyTorch takes")
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @property
    def stops(self) -> list[str]:
        """The stop strings, a list (the validator below made one of a single string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOPS} non-empty stop strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="default 16; 0 only with echo")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: Literal[1] = 1
    suffix: None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] = False


class Exchange(_Body):
    """An instruction and a response, for a reward model to score (prompted in the model's style)."""

    instruction: str
    input: str = ""
    response: str


class ClassifyRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[Exchange] = Field(min_length=1)
