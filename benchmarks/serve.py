"""`finetune serve` under concurrent clients: requests/s, tokens/s and latency percentiles (issue 15).

GPT-2 124M shape with random weights, served on 127.0.0.1 in this process (uvicorn in a thread).
Each client sends its requests one after another: a prompt of about 40 tokens, `max_tokens` new
tokens, greedy. With one client every request is decoded alone; with more, the engine decodes the
requests that are in flight together. The last row compares 8 clients with 1 (target: at least 2.5x
the token throughput).

    pip install -e ".[bench]"
    python benchmarks/serve.py [--clients 1 4 8 16] [--requests 32] [--max-tokens 64] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch
from common import cpu_name, served_server  # benchmarks/ is this script's directory

PROMPT = ("I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was no great "
          "surprise to me to hear that, in the height of his glory, he had dropped his painting")


def start_server(preset: str, max_batch: int) -> tuple[str, object]:
    server, port = served_server(preset, max_batch)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def complete(url: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        usage = json.loads(reply.read())["usage"]
    return time.perf_counter() - start, usage["completion_tokens"]


def drive(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests in all, spread over `clients` clients that each send theirs in turn."""
    def client(n: int) -> list[tuple[float, int]]:
        return [complete(url, max_tokens) for _ in range(n)]

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client, shares) for r in part]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]

    return {"clients": clients, "requests": len(results), "wall": wall, "rps": len(results) / wall,
            "tps": sum(tokens for _, tokens in results) / wall,
            "p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per case (at least 2 per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    url, server = start_server(args.preset, args.max_batch)
    complete(url, 4)  # warm-up
    print(f"# finetune serve, GPT-2 {args.preset} shape (random weights), fp32, prompt {len(PROMPT.split())} words "
          f"(~40 tokens), {args.max_tokens} new tokens, greedy, max batch {args.max_batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}")
    print("| clients | requests | wall s | requests/s | tokens/s | latency p50 s | p90 s | p99 s | tokens/s vs 1 client |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for clients in args.clients:
        row = rows[clients] = drive(url, clients, max(args.requests, 2 * clients), args.max_tokens)
        base = rows.get(1, row)["tps"]
        print(f"| {clients} | {row['requests']} | {row['wall']:.1f} | {row['rps']:.2f} | {row['tps']:.1f} | "
              f"{row['p50']:.2f} | {row['p90']:.2f} | {row['p99']:.2f} | {row['tps'] / base:.2f}x |", flush=True)
    if 1 in rows and 8 in rows:
        ratio = rows[8]["tps"] / rows[1]["tps"]
        print(f"\n8 concurrent clients: {ratio:.2f}x the token throughput of sequential requests "
              f"(target >= 2.5x: {'met' if ratio >= 2.5 else 'NOT met'})")
    server.should_exit = True


if __name__ == "__main__":
    main()
