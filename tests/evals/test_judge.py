"""The LLM-judge client against real HTTP servers on 127.0.0.1: both chat formats and the ways they fail."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import cli, one_line_error

RESPONSES = [("good", "85"), ("meh", "Score: 40/100."), ("refused", "I'm sorry, I cannot evaluate this.")]


class JudgeHandler(BaseHTTPRequestHandler):
    """Behaviour by the first path segment: ollama, openai, garbage, slow, forbidden, flaky."""

    requests: list = []
    flaky_failures: dict = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        mode = self.path.split("/")[1]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeHandler.requests.append((mode, body))
        prompt = body["messages"][0]["content"]
        answer = next(reply for response, reply in RESPONSES if f"score the model response `{response}`" in prompt)
        if mode == "slow":
            time.sleep(1.5)
        if mode == "forbidden":
            return self._send(403, b'{"error": "no access"}')
        if mode == "flaky" and JudgeHandler.flaky_failures.setdefault(prompt, 0) < 1:
            JudgeHandler.flaky_failures[prompt] += 1
            return self._send(500, b"overloaded")
        if mode == "garbage":
            return self._send(200, b"<html>not json</html>")
        if self.path.endswith("/api/chat"):
            payload = {"model": body["model"], "message": {"role": "assistant", "content": answer}, "done": True}
        else:
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
        self._send(200, json.dumps(payload).encode())

    def _send(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"instruction": "Describe X.", "input": "", "output": "X is Y.", "response": r}) + "\n"
                            for r, _ in RESPONSES))
    return path


def score(capsys, responses, url, *extra):
    code, printed, err = cli(capsys, "score", str(responses), "--judge-url", url, "--judge-model", "judge-1", "--json",
                             "--timeout", "0.5", "--retries", "1", *extra)
    assert code == 0, err
    raw = [json.loads(line) for line in responses.with_suffix(".judge.jsonl").read_text().splitlines()]
    return json.loads(printed), raw


@pytest.mark.parametrize("path", ["/ollama/api/chat", "/openai/v1/chat/completions"])
def test_both_formats_parse_scores_and_count_refusals(server, responses, capsys, path):
    JudgeHandler.requests.clear()
    summary, raw = score(capsys, responses, server + path)
    assert summary["judge_mean"] == pytest.approx(62.5) and summary["judge_scored"] == 2 and summary["judge_failed"] == 1
    assert {"n", "rouge_l", "exact_match"} <= set(summary)
    assert [r["score"] for r in raw] == [85, 40, None]
    assert raw[2]["raw"] == "I'm sorry, I cannot evaluate this." and "no integer" in raw[2]["error"]
    mode, body = JudgeHandler.requests[0]
    assert body["model"] == "judge-1" and body["messages"][0]["role"] == "user"
    assert "on a scale from 0 to 100" in body["messages"][0]["content"]
    if "ollama" in path:
        assert body["stream"] is False


def test_garbage_slow_and_forbidden_servers_are_counted_not_raised(server, responses, capsys):
    summary, raw = score(capsys, responses, server + "/garbage/api/chat")
    assert summary["judge_failed"] == 3 and summary["judge_mean"] is None
    assert raw[0]["raw"] == "<html>not json</html>" and "unexpected reply format" in raw[0]["error"]

    start = time.monotonic()
    summary, raw = score(capsys, responses, server + "/slow/api/chat")
    assert summary["judge_failed"] == 3 and all("timeout" in r["error"] for r in raw)
    assert all(r["attempts"] == 2 for r in raw)  # one retry each
    assert time.monotonic() - start < 3 * 2 * (0.5 + 1.0 * 1) + 3  # bounded: timeouts plus backoff

    JudgeHandler.requests.clear()
    summary, raw = score(capsys, responses, server + "/forbidden/v1/chat/completions")
    assert summary["judge_failed"] == 3 and raw[0]["error"] == "HTTP 403" and "no access" in raw[0]["raw"]
    assert len(JudgeHandler.requests) == 3  # a refusal is final: no retries


def test_server_errors_are_retried(server, responses, capsys):
    summary, raw = score(capsys, responses, server + "/flaky/api/chat")
    assert summary["judge_scored"] == 2 and [r["attempts"] for r in raw] == [2, 2, 2]


def test_unreachable_judge_and_bad_url(responses, capsys):
    summary, raw = score(capsys, responses, "http://127.0.0.1:9/api/chat")  # the discard port: nothing listens
    assert summary["judge_failed"] == 3 and "unreachable" in raw[0]["error"]
    assert "give the endpoint" in one_line_error(capsys, "score", str(responses), "--judge-url", "http://127.0.0.1:1",
                                                      "--judge-model", "m")


def test_the_judge_sees_the_instruction_in_the_style_the_model_was_asked_in(server, tmp_path, capsys):
    """responses.jsonl records the prompt style; a file without one (before 0.3) is alpaca, as then."""
    for style, marker in (("phi3", "<|user|>\nDescribe X."), (None, "### Instruction:\nDescribe X.")):
        path = tmp_path / f"{style}.jsonl"
        path.write_text("".join(json.dumps({"instruction": "Describe X.", "input": "", "output": "X is Y.", "response": r,
                                            **({"prompt_style": style} if style else {})}) + "\n" for r, _ in RESPONSES))
        JudgeHandler.requests.clear()
        score(capsys, path, server + "/openai/v1/chat/completions")
        assert all(marker in body["messages"][0]["content"] for _, body in JudgeHandler.requests), style
