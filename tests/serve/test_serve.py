"""`finetune serve`: OpenAI's API driven by the official `openai` client, answers checked against the
model itself, batching that never mixes requests, bad input and load that never stop the server."""

import faulthandler
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from finetune import GPT, GPTConfig
from finetune.model.classifier import GPTClassifier
from finetune.inference.generate import generate
from finetune.inference.loading import Loaded
from finetune.serve.app import create_app
from finetune.model.tokenizer import EOT_ID, encode, get_tokenizer

PROMPTS = ["Every effort moves you", "The", "It had always been my fate to", "I HAD always thought Jack Gisburn rather a cheap genius"]
KEY = "s3cret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread of this process, on a free port of 127.0.0.1.

    It leaves the process's logging as it is (`log_config=None`): uvicorn's own config runs
    `logging.config.dictConfig`, which closes every existing handler, and absl's (imported with rouge-score
    by any run) then closes its stream unless that is the current sys.stderr; under `capsys` it is not, and
    pytest's capture buffer was closed under it."""

    def __init__(self, app) -> None:
        import uvicorn

        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


@pytest.fixture(scope="module")
def lm():
    model = tiny_lm()
    running = Running(create_app(Loaded.of(model, model.checkpoint_meta(), "tiny"), KEY, max_batch=8))
    yield running, model
    running.close()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 3).eval()
    meta = {**model.checkpoint_meta(), "labels": ["billing", "shipping", "returns"], "max_length": 64, "keep": "start"}
    running = Running(create_app(Loaded.of(model, meta, "tickets")))
    yield running, model, meta
    running.close()


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def greedy(model, prompt, n):
    """What `finetune generate` prints: the new tokens of a greedy continuation, stopped at end-of-text."""
    ids = encode(prompt) if isinstance(prompt, str) else prompt
    out = generate(model, [ids], n, eos_id=EOT_ID)[0][len(ids):]
    return [t for t in out if t != EOT_ID]


def post(url, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completions_through_the_openai_client_equal_generate(lm):
    running, model = lm
    api = client(running.url)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    decode = get_tokenizer().decode
    for prompt in PROMPTS:
        reply = api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == decode(greedy(model, prompt, 12)), prompt
        assert reply.usage.prompt_tokens == len(encode(prompt)) and reply.usage.completion_tokens == 12
    # several prompts at once, as strings and as token ids (what lm-evaluation-harness sends)
    ids = [encode(p) for p in PROMPTS]
    for prompt in (PROMPTS, ids):
        reply = api.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        assert [c.text for c in reply.choices] == [decode(greedy(model, p, 6)) for p in PROMPTS]
    single = api.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0)
    assert single.choices[0].text == decode(greedy(model, PROMPTS[0], 6))


def test_concurrent_requests_are_batched_and_never_mixed(lm):
    running, model = lm
    api = client(running.url)
    jobs = [(PROMPTS[i % 4] + " again" * (i % 3), 5 + 3 * i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda job: api.completions.create(
            model="tiny", prompt=job[0], max_tokens=job[1], temperature=0).choices[0].text, jobs))
    decode = get_tokenizer().decode
    assert replies == [decode(greedy(model, p, n)) for p, n in jobs]
    assert health(running)["largest_batch"] > 1  # the requests were decoded together, not one at a time


def test_echo_logprobs_score_the_prompt_as_the_model_does(lm):
    running, model = lm
    prompt = encode(PROMPTS[3])
    reply = client(running.url).completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3,
                                                   temperature=0)
    choice = reply.choices[0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0].log_softmax(-1)
    assert choice.text == PROMPTS[3] and choice.logprobs.token_logprobs[0] is None
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (got - want).abs().max() <= 1e-5
    top = choice.logprobs.top_logprobs[1]
    best = expected[0].topk(3)
    assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-5)
    assert list(top) == [get_tokenizer().decode([t]) for t in best.indices.tolist()]
    assert choice.logprobs.tokens == [get_tokenizer().decode([t]) for t in prompt]
    tokens = choice.logprobs.tokens
    assert "".join(tokens) == choice.text
    assert choice.logprobs.text_offset == [len("".join(tokens[:i])) for i in range(len(tokens))]
    # greedy check as lm-evaluation-harness does it: the continuation's tokens are each the top-1 token
    reply = client(running.url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, logprobs=1, temperature=0)
    lp = reply.choices[0].logprobs
    assert all(list(top)[0] == token for top, token in zip(lp.top_logprobs, lp.tokens))


def test_chat_and_streaming(lm):
    running, model = lm
    api = client(running.url)
    decode = get_tokenizer().decode
    expected = decode(greedy(model, "Hello there", 10))
    reply = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                        max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                              max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    pieces = list(api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == decode(greedy(model, PROMPTS[0], 10))
    assert pieces[-1].choices[0].finish_reason == "length" and len(pieces) > 3


def test_stop_strings_and_seeds(lm):
    running, model = lm
    api = client(running.url)
    full = get_tokenizer().decode(greedy(model, PROMPTS[0], 20))
    stop = full[5:9]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in api.completions.create(
                model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop], stream=True))
        else:
            reply = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop)
            text = reply.choices[0].text
            assert reply.choices[0].finish_reason == "stop"
        assert text == full[:full.index(stop)]
    sampled = [api.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1.0, top_p=0.9, seed=s)
               .choices[0].text for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    # What lm-evaluation-harness sends: its task's stop strings plus end-of-text, five in all; the largest seed.
    stops = ["\n\n", "Question:", "</s>", "<|im_end|>", stop]
    reply = api.completions.create(model="tiny", prompt=[PROMPTS[0]] * 2, max_tokens=20, temperature=0, stop=stops,
                                   seed=2**63 - 1)
    assert [c.text for c in reply.choices] == [full[:full.index(stop)]] * 2


BAD = [
    ("malformed JSON", "/v1/completions", None, b'{"prompt": "x",', 400, None),
    ("unknown field", "/v1/completions", {"prompt": "x", "max_token": 3}, None, 400, "max_token"),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "3"}, None, 400, "max_tokens"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ("beyond the context", "/v1/completions", {"prompt": "x", "max_tokens": 300}, None, 400, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": [5] * 300, "max_tokens": 1}, None, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [50257], "max_tokens": 1}, None, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 1}, None, 400, "prompt"),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 2}, None, 400, "n"),
    ("penalty", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, None, 400, "presence_penalty"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("no user message", "/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, None, 400, "messages"),
    ("a system message to a model with no chat format", "/v1/chat/completions",
     {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, None, 400, "messages"),
    ("an assistant message last", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, None, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, 400, "messages.0.role"),
    ("classify a language model", "/v1/classify", {"input": "x"}, None, 400, "model"),
    ("oversized body", "/v1/completions", None, b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413, None),
    ("no such route", "/v1/engines", {}, None, 404, None),
    ("seed beyond 64 bits", "/v1/completions", {"prompt": "x", "seed": 2**64}, None, 400, "seed"),
    ("17 stop strings", "/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, None, 400, "stop"),
]


@pytest.mark.parametrize("case, path, body, raw, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(lm, case, path, body, raw, status, param):
    running, model = lm
    code, reply = post(running.url, path, body, raw=raw)
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]
    if param:
        assert param.split(".")[0] in reply["error"]["message"]
    code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 3, "temperature": 0})
    assert code == 200 and reply["choices"][0]["text"] == get_tokenizer().decode(greedy(model, "The", 3))


def test_an_oversized_body_sent_in_chunks_is_refused(lm):
    import http.client

    running, model = lm
    connection = http.client.HTTPConnection(*running.url.removeprefix("http://").split(":"))
    parts = [b'{"prompt": "', *[b"x" * 65536] * 40, b'"}']  # 2.5 MiB, no Content-Length
    connection.request("POST", "/v1/completions", body=iter(parts), encode_chunked=True,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = connection.getresponse()
    assert reply.status == 413 and "request body over" in json.loads(reply.read())["error"]["message"]
    code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 3, "temperature": 0})
    assert code == 200 and reply["choices"][0]["text"] == get_tokenizer().decode(greedy(model, "The", 3))


def test_a_failure_inside_the_engine_ends_that_request_not_the_server():
    model = tiny_lm(seed=6)
    running = Running(create_app(Loaded.of(model, model.checkpoint_meta(), "tiny")))
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        model.forward = broken
        code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 3})
        assert code == 500 and reply["error"]["type"] == "server_error" and "boom" in reply["error"]["message"]
        del model.forward
        code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 3, "temperature": 0})
        assert code == 200 and reply["choices"][0]["text"] == get_tokenizer().decode(greedy(model, "The", 3))
    finally:
        running.close()


def test_wrong_api_key_and_openai_errors(lm):
    import openai

    running, _ = lm
    with pytest.raises(openai.AuthenticationError):
        client(running.url, key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    for key in ("wrong", ""):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(running.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}))
        assert refused.value.code == 401 and json.loads(refused.value.read())["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(running.url).completions.create(model="tiny", prompt="x", max_tokens=1000)


def health(running) -> dict:
    return json.loads(urllib.request.urlopen(urllib.request.Request(
        running.url + "/health", headers={"Authorization": f"Bearer {KEY}"})).read())


def slow_server() -> Running:
    torch.manual_seed(0)  # a model slow enough (a few ms a token) that 400 tokens outlast noticing the client left
    model = GPT(GPTConfig(n_embd=256, n_layer=8, n_head=8, context_length=512)).eval()
    return Running(create_app(Loaded.of(model, model.checkpoint_meta(), "slow"), KEY))


def assert_place_freed(running) -> None:
    """The request whose client left is dropped long before its 400 tokens: `active` falls to 0 and
    `tokens_generated` stops (the model makes 400 in about a second, so the count, not a clock, says how
    soon). If not, say which: a stalled engine (no new tokens) or a lost cancel (tokens still growing), with
    every thread's stack."""
    seen = [health(running)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.05)
        seen.append(health(running))
        if seen[-1]["active"] == 0 and seen[-1]["tokens_generated"] == seen[-2]["tokens_generated"]:
            break
    last = seen[-1]
    if last["active"] or last["tokens_generated"] >= 300:
        faulthandler.dump_traceback(all_threads=True)
        verdict = ("lost cancel: it went on decoding" if last["tokens_generated"] > seen[0]["tokens_generated"] + 1
                   else "stalled engine: no step")
        pytest.fail(f"{verdict}; health first {seen[0]}, last {last}")


def test_a_client_that_leaves_mid_stream_frees_its_place():
    """With the garbage collector off: the cancel must not wait for the abandoned stream to be finalised,
    which in a process with a large heap (a server after hours, the whole test suite) can take long."""
    running = slow_server()
    gc.disable()
    try:
        body = json.dumps({"prompt": "The", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
        request = urllib.request.Request(running.url + "/v1/completions", body,
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        reply = urllib.request.urlopen(request)
        reply.readline()
        reply.close()  # leave after the first event
        assert_place_freed(running)
    finally:
        gc.enable()
        running.close()


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The", "max_tokens": 400, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "The"}], "max_tokens": 400, "temperature": 0}),
])
def test_a_client_that_leaves_before_a_whole_reply_frees_its_place(path, body):
    running = slow_server()
    try:
        host, port = running.url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            deadline = time.monotonic() + 10
            while not health(running)["tokens_generated"] and time.monotonic() < deadline:
                time.sleep(0.005)
        assert_place_freed(running)  # the client left while its reply was being decoded
    finally:
        running.close()


def test_health_reports_the_engine_and_a_dead_engine_answers_503():
    model = tiny_lm(seed=3)
    running = Running(create_app(Loaded.of(model, model.checkpoint_meta(), "tiny")))
    try:
        state = health(running)
        assert state["alive"] and state["active"] == 0 and state["last_step_age_s"] >= 0 and state["failure"] is None
        engine = running.server.config.app.state.engine

        def die(admitted):
            raise SystemExit("planted")

        engine._serve = die  # the decoding thread ends at its next turn
        code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 3})
        assert code == 500 and "planted" in reply["error"]["message"]
        for path, body in (("/v1/completions", {"prompt": "The", "max_tokens": 3}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            code, reply = post(running.url, path, body)
            assert code == 503 and reply["error"]["type"] == "server_error", reply
            message = reply["error"]["message"]
            assert "\n" not in message and "SystemExit: planted" in message and "restart" in message
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            health(running)
        state = json.loads(unhealthy.value.read())
        assert unhealthy.value.code == 503 and not state["alive"] and state["failure"] == "SystemExit: planted"
    finally:
        running.close()


def test_a_temperature_too_small_to_divide_by_is_greedy(lm):
    running, model = lm
    for temperature in (1e-45, 1e-6):
        code, reply = post(running.url, "/v1/completions", {"prompt": "The", "max_tokens": 5, "temperature": temperature})
        assert code == 200 and reply["choices"][0]["text"] == get_tokenizer().decode(greedy(model, "The", 5))
    assert generate(model, [encode("The")], 5, temperature=1e-45) == generate(model, [encode("The")], 5)


@pytest.mark.parametrize("headers, status", [
    ({"Host": "evil.example"}, 403),
    ({"Host": "evil.example:8000"}, 403),
    ({"Origin": "http://evil.example"}, 403),
    ({"Host": "localhost:8000", "Origin": "http://127.0.0.1:8000"}, 200),
    ({"Host": "[::1]:8000"}, 200),
    ({"Host": "app.localhost"}, 200),
])
def test_a_server_on_loopback_answers_loopback_names_only(lm, headers, status):
    running, _ = lm
    request = urllib.request.Request(running.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}", **headers})
    try:
        with urllib.request.urlopen(request) as reply:
            code = reply.status
    except urllib.error.HTTPError as e:
        code, error = e.code, json.loads(e.read())["error"]
        assert "evil.example" in error["message"] and "--allow-host" in error["message"]
    assert code == status


def test_allowed_hosts_are_answered():
    model = tiny_lm()
    for allowed, status in ((["models.example"], 200), (["*"], 200), (None, 200), ([], 403)):
        running = Running(create_app(Loaded.of(model, model.checkpoint_meta(), "tiny"), allowed_hosts=allowed))
        try:
            request = urllib.request.Request(running.url + "/v1/models", headers={"Host": "models.example"})
            try:
                code = urllib.request.urlopen(request).status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code == status, allowed
        finally:
            running.close()


def test_classification_endpoint(classifier, lm):
    from finetune.inference.predict import predict

    running, model, meta = classifier
    texts = ["my invoice is wrong", "where is my parcel", "x"]
    code, reply = post(running.url, "/v1/classify", {"input": texts})
    assert code == 200
    expected = predict(model, meta, texts).values.float()
    for row, p in zip(reply["data"], expected):
        assert list(row["probabilities"]) == meta["labels"]
        assert torch.tensor(list(row["probabilities"].values())) == pytest.approx(p, abs=1e-6)
        assert row["label"] == meta["labels"][int(p.argmax())]
    assert post(running.url, "/v1/completions", {"prompt": "x"})[0] == 400
    assert post(running.url, "/v1/classify", {"input": ["ok", " "]})[1]["error"]["message"].startswith("input[1]")
    code, reply = post(running.url, "/v1/classify", {"input": [{"instruction": "a", "response": "b"}]})
    assert code == 400 and "for reward models" in reply["error"]["message"]  # not a reward model: refused


def test_a_reward_model_scores_instruction_response_objects_and_refuses_a_mixed_list():
    from finetune.data.prompts import format_exchange
    from finetune.inference.predict import predict

    torch.manual_seed(3)
    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 1).eval()
    meta = {**model.checkpoint_meta(), "labels": ["reward"], "max_length": 64, "keep": "start",
            "problem_type": "reward", "prompt_style": "alpaca"}
    running = Running(create_app(Loaded.of(model, meta, "rm")))
    try:
        code, reply = post(running.url, "/v1/classify", {"input": [{"instruction": "Say hi.", "response": "Hi!"}]})
        assert code == 200
        expected = predict(model, meta, [format_exchange("alpaca", "Say hi.", "", "Hi!")]).values[0, 0].item()
        assert reply["data"][0]["reward"] == pytest.approx(expected, abs=1e-6)
        code, reply = post(running.url, "/v1/classify", {"input": ["text", {"instruction": "a", "response": "b"}]})
        assert code == 400 and reply["error"]["param"].startswith("input")  # texts or objects, not both
        code, reply = post(running.url, "/v1/classify", {"input": [{"instruction": "a"}]})
        assert code == 400  # no response: the request's shape is refused
    finally:
        running.close()


def test_load_with_bad_requests_mixed_in(lm):
    """Hundreds of requests from 16 clients, every fourth one bad: every good one gets its complete,
    correct answer, and memory stays bounded."""
    running, model = lm
    decode = get_tokenizer().decode
    expected = {(p, n): decode(greedy(model, p, n)) for p in PROMPTS for n in (3, 7)}
    jobs = [(PROMPTS[i % 4], 3 if i % 2 else 7, i % 4 == 3) for i in range(320)]

    def one(job):
        prompt, n, bad = job
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, **({"max_tokens": -n} if bad else {})}
        return post(running.url, "/v1/completions", body)

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, jobs[:32]))  # warm up
        before = rss()
        results = list(pool.map(one, jobs))
    assert rss() - before < 150, "memory grew under load"
    for (prompt, n, bad), (code, reply) in zip(jobs, results):
        if bad:
            assert code == 400 and reply["error"]["param"] == "max_tokens"
        else:
            assert code == 200 and reply["choices"][0]["text"] == expected[(prompt, n)]


# -- the command, the judge client and the page -------------------------------------------------------


def serve_command(directory, ignore_sigint: bool = False) -> tuple[subprocess.Popen, str]:
    """`finetune serve DIRECTORY` in its own process, once it answers; started with SIGINT ignored, as
    `nohup` starts a command, or with the default disposition whatever this process has."""
    port = free_port()
    disposition = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
    process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(directory), "--port", str(port)],
                               stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return process, url
        except OSError:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
    raise AssertionError("finetune serve did not answer within a minute")


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory):
    """`finetune serve` in its own process, on a checkpoint `finetune generate` reads too."""
    from finetune.checkpoints.atomic import write_directory
    from finetune.checkpoints.model_files import model_files

    directory = tmp_path_factory.mktemp("served") / "tiny"
    write_directory(directory, model_files(tiny_lm(seed=3), {}))
    process, url = serve_command(directory)
    yield url, directory
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_ctrl_c_twice_stops_the_server_mid_stream_without_a_traceback(tmp_path, sigint):
    """The first Ctrl-C gives replies in flight a few seconds; a second stops at once. Either way the user
    sees one line, not the tracebacks of cancelled tasks or of the decoding thread, and status 130: also
    when the server was started with SIGINT ignored, as `nohup` and a script's `&` start it."""
    from finetune.checkpoints.atomic import write_directory
    from finetune.checkpoints.model_files import model_files

    # The replies must outlast both Ctrl-Cs: 4 x 1,000 greedy tokens of a model that makes a few hundred a
    # second, not 250 of gpt2-tiny, which can end within the 0.2 s between them.
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_embd=256, n_layer=8, n_head=8, context_length=1024)).eval()
    write_directory(tmp_path / "slow", model_files(model, {}))
    process, url = serve_command(tmp_path / "slow", ignore_sigint=sigint == "ignored")

    def stream() -> None:
        body = json.dumps({"prompt": "The", "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", body, {"content-type": "application/json"})).read()
        except Exception:  # the reply is cut short: that is the point
            pass

    streams = [threading.Thread(target=stream) for _ in range(4)]
    for t in streams:
        t.start()
    while json.loads(urllib.request.urlopen(url + "/health").read())["active"] < 4:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    err = process.stderr.read()
    assert "Traceback" not in err and "Event loop is closed" not in err and "terminate called" not in err, err
    assert err.splitlines()[-1] == "finetune: interrupted"
    for t in streams:
        t.join(timeout=30)


def test_serve_command_answers_as_generate_does(served_checkpoint, capsys):
    from tests.helpers import cli

    url, directory = served_checkpoint
    code, stdout, _ = cli(capsys, "generate", "--model", str(directory), "--prompt", PROMPTS[0], "--max-new-tokens", "15")
    reply = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=15, temperature=0)
    assert code == 0 and reply.choices[0].text == stdout[:-1]  # print() added the newline


def test_judge_client_scores_against_finetune_serve(served_checkpoint, tmp_path, capsys):
    from tests.helpers import cli

    url, _ = served_checkpoint
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": str(i), "response": str(i)})
                                 + "\n" for i in range(3)))
    code, stdout, err = cli(capsys, "score", str(responses), "--judge-url", url + "/v1", "--judge-model", "tiny")
    assert code == 0, err
    records = [json.loads(line) for line in responses.with_suffix(".judge.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["raw"] for r in records)  # each judgement got the server's reply
    assert all(r["error"] in (None, "no integer score 0-100 in the reply") for r in records)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(driver)):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def test_page_streams_a_reply_in_a_real_browser(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = tiny_lm(seed=5)
    running = Running(create_app(Loaded.of(model, model.checkpoint_meta(), "tiny")))
    try:
        browser.get(running.url + "/")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "title").text == "tiny")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        browser.find_element(By.ID, "prompt").send_keys("Every effort moves you")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "reply").get_attribute("data-done") == "true")
        shown = browser.find_element(By.ID, "reply").get_attribute("textContent")
        assert shown == get_tokenizer().decode(greedy(model, "Every effort moves you", 12))
        assert browser.find_element(By.ID, "error").text == ""
    finally:
        running.close()


def test_page_keeps_the_conversation_of_a_chat_model_in_a_real_browser(browser):
    """A chatml model: the second reply answers the system message, the first exchange and the new message;
    "New conversation" starts again from the system message alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from finetune.checkpoints.interface import Generation, interface_meta
    from finetune.inference.respond import reply

    model = tiny_lm(seed=6)
    generation = Generation(max_new_tokens=8, stop=["<|im_end|>"])
    running = Running(create_app(Loaded.of(model, model.checkpoint_meta() | interface_meta("chatml", generation, 1), "c")))

    def say(text: str) -> str:
        browser.find_element(By.ID, "prompt").send_keys(text)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "reply").get_attribute("data-done") == "true")
        return browser.find_element(By.ID, "reply").get_attribute("textContent")

    try:
        browser.get(running.url + "/")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "title").text == "c")
        assert browser.find_element(By.ID, "system").is_displayed()
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("8")
        browser.find_element(By.ID, "system").send_keys("Be brief.")
        system = {"role": "system", "content": "Be brief."}
        first = say("Name a colour.")
        assert first == reply(model, [[system, {"role": "user", "content": "Name a colour."}]], "chatml", generation)[0]
        second = say("Another one?")
        asked = [system, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first},
                 {"role": "user", "content": "Another one?"}]
        assert second == reply(model, [asked], "chatml", generation)[0]
        assert second != reply(model, [[system, asked[-1]]], "chatml", generation)[0]  # the history mattered
        browser.find_element(By.ID, "reset").click()
        again = say("Another one?")
        assert again == reply(model, [[system, asked[-1]]], "chatml", generation)[0]
        assert browser.find_element(By.ID, "error").text == ""
    finally:
        running.close()


def test_page_shows_class_probabilities_in_a_real_browser(browser, classifier):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running, model, meta = classifier
    browser.get(running.url + "/")
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "title").text == "tickets")
    browser.find_element(By.ID, "text").send_keys("where is my parcel")
    browser.find_element(By.ID, "classify").click()
    rows = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#bars .row"))
    from finetune.inference.predict import predict

    expected = dict(zip(meta["labels"], predict(model, meta, ["where is my parcel"]).values[0].tolist()))
    shown = {row.get_attribute("data-label"): float(row.get_attribute("data-probability")) for row in rows}
    assert shown == pytest.approx(expected, abs=1e-6)
    widths = [row.find_element(By.CSS_SELECTOR, ".bar").value_of_css_property("width") for row in rows]
    assert len(set(widths)) > 1 or len(rows) == 1  # bars drawn to their probabilities


def test_chat_with_an_instruct_run_is_what_finetune_respond_answers():
    """The whole conversation, system message included, is rendered in the run's Alpaca format; the reply is
    `reply`'s (what `finetune chat` answers), stripped, as long as the run's generation.max_new_tokens by default;
    one user message is what `finetune respond` answers."""
    from finetune.checkpoints.interface import Generation, interface_meta
    from finetune.data.records import Record
    from finetune.inference.respond import reply, respond

    model = tiny_lm(seed=4)
    generation = Generation(max_new_tokens=24)
    meta = model.checkpoint_meta() | interface_meta("alpaca", generation, seed=123)
    running = Running(create_app(Loaded.of(model, meta, "instruct")))
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Rewrite: the cake was ate."}]
        answer = client(running.url).chat.completions.create(model="instruct", messages=messages, temperature=0)
        expected = reply(model, [messages], "alpaca", generation)[0]
        assert answer.choices[0].message.content == expected
        assert answer.usage.completion_tokens <= 24
        alone = reply(model, [messages[-1:]], "alpaca", generation)[0]
        assert alone == respond(model, [Record("Rewrite: the cake was ate.")], "alpaca", generation)[0] != expected
        streamed = "".join(c.choices[0].delta.content or "" for c in client(running.url).chat.completions.create(
            model="instruct", messages=messages, temperature=0, stream=True))
        assert streamed.strip() == expected and not streamed.startswith((" ", "\n"))
    finally:
        running.close()


def test_readme_client_snippet_runs(lm, capsys):
    """docs/serving.md's Python block, run as written against a server (its address swapped in)."""
    import re
    from pathlib import Path

    running, _ = lm
    section = (Path(__file__).parent.parent.parent / "docs" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(blocks[0].replace("http://127.0.0.1:8000", running.url).replace('api_key="unused"', f'api_key="{KEY}"'), {})
    assert capsys.readouterr().out.strip()


def staggered(engine, model, joiners, first=(3, 14, 15), first_tokens=29):
    """Request "a" decodes; each (prompt, n) of `joiners` is submitted when "a" has made two more tokens.
    Returns, per request, its prompt, tokens and log-probs."""
    from finetune.inference.engine import Request

    runs = {"a": (list(first), first_tokens)} | {f"j{k}": (list(p), n) for k, (p, n) in enumerate(joiners)}
    got = {name: {"tokens": [], "logprobs": [], "done": threading.Event()} for name in runs}

    def collect(name):
        def emit(event):
            if event.kind == "token":
                got[name]["tokens"].append(event.scores[0].token)
                got[name]["logprobs"].append(event.scores[0].logprob)
                made = len(got["a"]["tokens"])
                if name == "a" and made % 2 == 0 and 0 < made // 2 <= len(joiners):
                    joiner = f"j{made // 2 - 1}"
                    engine.submit(Request(runs[joiner][0], runs[joiner][1], collect(joiner), logprobs=0))
            elif event.kind in ("done", "error"):
                got[name]["error"] = event.message
                got[name]["done"].set()
        return emit

    try:
        engine.submit(Request(runs["a"][0], runs["a"][1], collect("a"), logprobs=0))
        for name in runs:
            assert got[name]["done"].wait(30), name
    finally:
        engine.close()
    return {name: (runs[name][0], runs[name][1], got[name]) for name in runs}


def assert_each_as_alone(model, results):
    """Every request's tokens are generate()'s alone, and every step saw exactly its own keys and values."""
    for name, (prompt, n, got) in results.items():
        assert got["error"] is None, (name, got["error"])
        assert got["tokens"] == generate(model, [prompt], n, eos_id=EOT_ID)[0][len(prompt):], name
        sequence = prompt + got["tokens"]
        with torch.no_grad():
            expected = model(torch.tensor([sequence]))[0].log_softmax(-1)
        positions = torch.arange(len(prompt) - 1, len(sequence) - 1)
        want = expected[positions, torch.tensor(got["tokens"])]
        assert (torch.tensor(got["logprobs"]) - want).abs().max() <= 1e-5, name


def test_engine_moves_rows_for_a_longer_prompt_and_when_the_context_fills():
    """A request with a longer prompt joins mid-decode (every row moves right), and the shared cache later
    reaches the context (every row moves left): both answers stay what each computes alone."""
    from finetune.inference.engine import Engine

    torch.manual_seed(2)
    model = GPT(GPTConfig(n_embd=32, n_layer=2, n_head=4, context_length=32)).eval()
    second = list(range(100, 112))  # 12 tokens: longer than the cache is filled when it arrives
    assert_each_as_alone(model, staggered(Engine(model, max_batch=4), model, [(second, 20)]))


def test_engine_never_reads_cache_memory_a_row_does_not_own():
    """Recycled memory (NaN here) in the cache before requests arrive: a request joining while another
    decodes (placed after position 0), a longer one moving every row right, the context filling (every row
    moves left) and a slot reused by a new request all answer as each does alone."""
    from finetune.inference.engine import Engine

    torch.manual_seed(2)
    model = GPT(GPTConfig(n_embd=32, n_layer=2, n_head=4, context_length=32)).eval()
    engine = Engine(model, max_batch=4)
    engine._ensure(model.config.context_length)  # the thread waits for work: nothing else touches the cache
    engine._k.fill_(float("nan"))
    engine._v.fill_(float("nan"))
    joiners = [([7, 8], 3), (list(range(100, 112)), 17), ([9], 5), ([40, 41, 42], 6)]
    assert_each_as_alone(model, staggered(engine, model, joiners))


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_page_shows_label_sets_and_numbers_in_a_real_browser(browser, problem_type):
    """A multi-label model's labels over their thresholds are marked; a regression model's numbers are shown
    in the target's units."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from finetune.inference.predict import predict

    torch.manual_seed(2)
    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 3).eval()
    meta = {**model.checkpoint_meta(), "labels": ["a", "b", "c"], "max_length": 64, "keep": "start",
            "problem_type": problem_type, "thresholds": [0.3, 0.5, 0.7], "target_mean": [10.0, 0.0, -5.0],
            "target_std": [2.0, 1.0, 100.0]}
    running = Running(create_app(Loaded.of(model, meta, "heads")))
    try:
        browser.get(running.url + "/")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "title").text == "heads")
        browser.find_element(By.ID, "text").send_keys("where is my parcel")
        browser.find_element(By.ID, "classify").click()
        rows = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#bars .row"))
        expected = predict(model, meta, ["where is my parcel"])
        if problem_type == "regression":
            shown = {row.get_attribute("data-label"): float(row.get_attribute("data-value")) for row in rows}
            assert shown == pytest.approx(dict(zip(meta["labels"], expected.values[0].tolist())), abs=1e-6)
        else:
            marked = {row.get_attribute("data-label") for row in rows if "chosen" in row.get_attribute("class")}
            assert marked == set(expected.label_sets()[0]) and 0 < len(marked) < 3  # some marked, not all
    finally:
        running.close()
