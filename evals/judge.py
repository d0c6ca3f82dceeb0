"""Score responses 0-100 with an LLM judge behind an Ollama (`/api/chat`) or OpenAI-compatible
(`/v1/chat/completions`) endpoint, with the book's rubric (chapter 7).

The judge is a remote service: replies can be slow, malformed, refusals or errors. Each failure is
counted, never raised; every raw reply is kept so a person can check what the judge said.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from finetune.errors import UserError

RUBRIC = (
    "Given the input `{prompt}` and correct output `{reference}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
_SCORE = re.compile(r"(?<![\d.\-])(100|[1-9]?\d)(?!\d|\.\d)")


@dataclass
class Judgement:
    score: int | None  # None: no usable score
    raw: str | None  # the judge's reply text, or the body that could not be read
    error: str | None  # why there is no score (timeout, HTTP 500, no integer, ...)
    attempts: int


class JudgeClient:
    def __init__(self, url: str, model: str, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0) -> None:
        if url.rstrip("/").endswith("/v1"):  # an OpenAI-compatible base URL, as OpenAI's clients take it
            url = url.rstrip("/") + "/chat/completions"
        if url.rstrip("/").endswith("/api/chat"):
            self.api = "ollama"
        elif url.rstrip("/").endswith("/chat/completions"):
            self.api = "openai"
        else:
            raise UserError(
                f"judge URL {url!r}: give the endpoint, e.g. http://localhost:11434/api/chat (Ollama) "
                "or http://localhost:8000/v1 (OpenAI-compatible, e.g. finetune serve)"
            )
        self.url, self.model = url, model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def judge(self, prompt: str, reference: str, response: str) -> Judgement:
        message = RUBRIC.format(prompt=prompt, reference=reference, response=response)
        last_error, raw = None, None
        for attempt in range(1, self.retries + 2):
            try:
                raw = self._chat(message)
            except _Retryable as e:
                last_error, raw = str(e), e.body
                if attempt <= self.retries:
                    time.sleep(self.backoff * attempt)
                continue
            except _Final as e:
                return Judgement(None, e.body, str(e), attempt)
            score = parse_score(raw)
            if score is None:
                return Judgement(None, raw, "no integer score 0-100 in the reply", attempt)
            return Judgement(score, raw, None, attempt)
        return Judgement(None, raw, last_error, self.retries + 1)

    def _chat(self, message: str) -> str:
        messages = [{"role": "user", "content": message}]
        if self.api == "ollama":
            body = {
                "model": self.model,
                "messages": messages,
                "stream": False,
                "options": {"temperature": 0, "seed": 123},
            }
        else:
            body = {"model": self.model, "messages": messages, "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if self.api == "openai" and os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                text = reply.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")[:500]
            error = _Retryable if e.code >= 500 or e.code == 429 else _Final
            raise error(f"HTTP {e.code}", detail) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(
                f"timeout after {self.timeout:g}s" if isinstance(reason, TimeoutError) else f"unreachable: {reason}"
            ) from e
        try:
            document = json.loads(text)
            if self.api == "ollama":
                return str(document["message"]["content"])
            return str(document["choices"][0]["message"]["content"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise _Final(f"unexpected reply format ({type(e).__name__})", text[:2000]) from e


class _Failure(Exception):
    def __init__(self, message: str, body: str | None = None) -> None:
        super().__init__(message)
        self.body = body


class _Retryable(_Failure):
    """Timeouts, unreachable servers, HTTP 429 and 5xx: worth another try."""


class _Final(_Failure):
    """Refusals (HTTP 4xx) and replies in an unknown format: another try would get the same."""


def parse_score(reply: str | None) -> int | None:
    """The first integer 0-100 standing alone in the reply ("85", "Score: 85/100", "**90**")."""
    if not reply:
        return None
    match = _SCORE.search(reply)
    return int(match.group(1)) if match else None


def judge_all(client: JudgeClient, items: list[dict], progress=None) -> tuple[dict, list[dict]]:
    """Summary (mean over scored, counts) and one record per item with the raw reply."""
    records = []
    for item in progress(items) if progress else items:
        judgement = client.judge(item["prompt"], item["reference"], item["response"])
        records.append(asdict(judgement))
    scores = [r["score"] for r in records if r["score"] is not None]
    summary = {
        "judge_model": client.model,
        "judge_url": client.url,
        "judge_mean": sum(scores) / len(scores) if scores else None,
        "judge_scored": len(scores),
        "judge_failed": len(records) - len(scores),
    }
    return summary, records
