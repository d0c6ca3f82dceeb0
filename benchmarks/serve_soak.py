"""`finetune serve` under a long mixed load: every reply that completes must equal the same request sent
alone (issue 30).

A server process on 127.0.0.1 holds a seeded random gpt2-tiny. First each of `--distinct` request kinds
(completions or chat, streamed or not, greedy or seeded sampling, prompts of 1-60 tokens, 1-48 new
tokens) is sent alone, one after another: that is its reference reply. Then `--requests` requests drawn
from them arrive from `--clients` concurrent clients at staggered times, and one client in ten leaves
early (after the first streamed event, or right after sending). Every completed reply is compared with
its reference; the server's resident memory is read at the start and the end.

    python benchmarks/serve_soak.py [--requests 2000] [--clients 16] [--distinct 120]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import random
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import torch
from common import cpu_name, served_server  # benchmarks/ is this script's directory

WORDS = ("the river ran past every house in the old town and nobody there had ever asked where it came "
         "from or why it never froze in winter").split()


def serve(port_out, preset: str, max_batch: int) -> None:
    """The server process: a seeded random model behind finetune's app, until terminated."""
    server, port = served_server(preset, max_batch, log_level="error")
    port_out.put(port)
    server.run()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def kinds(n: int, rng: random.Random) -> list[dict]:
    """`n` distinct requests: (path, body), greedy or seeded, streamed or not."""
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 45)))
        body: dict = {"max_tokens": rng.randint(1, 48), "stream": rng.random() < 0.5}
        if rng.random() < 0.5:
            body |= {"temperature": 0}
        else:
            body |= {"temperature": round(rng.uniform(0.5, 1.2), 2), "top_p": rng.choice([1.0, 0.9]), "seed": rng.randint(0, 2**31)}
        if i % 2:
            out.append({"path": "/v1/chat/completions", "body": body | {"messages": [{"role": "user", "content": prompt}]}})
        else:
            out.append({"path": "/v1/completions", "body": body | {"prompt": prompt}})
    return out


def send(port: int, kind: dict, leave: bool = False) -> tuple[str | None, float]:
    """The reply's text (None if this client left early) and the seconds it took."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", kind["path"], json.dumps(kind["body"]), {"Content-Type": "application/json"})
        if leave and not kind["body"]["stream"]:
            return None, time.perf_counter() - start  # gone before the reply
        reply = connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"{kind['path']} answered {reply.status}: {reply.read()[:200]!r}")
        chat = kind["path"].endswith("chat/completions")
        if not kind["body"]["stream"]:
            choice = json.loads(reply.read())["choices"][0]
            return (choice["message"]["content"] if chat else choice["text"]), time.perf_counter() - start
        text = ""
        for line in reply:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if leave:
                return None, time.perf_counter() - start
            choices = json.loads(line[6:])["choices"]
            if choices:
                text += (choices[0]["delta"].get("content") or "") if chat else choices[0]["text"]
        return text, time.perf_counter() - start
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=120)
    parser.add_argument("--preset", default="gpt2-tiny")
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    process = context.Process(target=serve, args=(ports, args.preset, args.max_batch), daemon=True)
    process.start()
    port = ports.get(timeout=120)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    rng = random.Random(0)
    pool = kinds(args.distinct, rng)
    rss_start = rss_mib(process.pid)
    reference = [send(port, kind)[0] for kind in pool]  # each alone

    plan = [(rng.randrange(len(pool)), rng.random() < 0.1, rng.uniform(0, 0.05)) for _ in range(args.requests)]

    def one(item: tuple[int, bool, float]) -> tuple[int, str | None, float]:
        index, leave, pause = item
        time.sleep(pause)  # staggered arrivals: requests join while others decode
        text, seconds = send(port, pool[index], leave)
        return index, text, seconds

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as clients:
        results = list(clients.map(one, plan))
    wall = time.perf_counter() - start
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/health")
    health = json.loads(connection.getresponse().read())
    rss_end = rss_mib(process.pid)
    process.terminate()

    completed = [(i, text, s) for i, text, s in results if text is not None]
    mismatches = [(i, text) for i, text, _ in completed if text != reference[i]]
    latencies = sorted(s for _, _, s in completed)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"# finetune serve soak, {args.preset} (random weights, seeded), max batch {args.max_batch}, "
          f"{args.clients} clients, {torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}, "
          f"{date.today().isoformat()}")
    print("| requests | completed | left early | mismatches | largest batch | wall s | RSS start MiB | RSS end MiB "
          "| latency p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(results)} | {len(completed)} | {len(results) - len(completed)} | {len(mismatches)} | "
          f"{health['largest_batch']} | {wall:.0f} | {rss_start:.0f} | {rss_end:.0f} | "
          f"{statistics.median(latencies):.2f} | {p99:.2f} |")
    for index, text in mismatches[:5]:
        print(f"mismatch: {pool[index]} gave {text!r}, alone {reference[index]!r}")
    if health["active"] or not health["alive"]:
        print(f"after the load the engine holds {health['active']} requests, alive: {health['alive']}")
    raise SystemExit(1 if mismatches or health["active"] else 0)


if __name__ == "__main__":
    main()
