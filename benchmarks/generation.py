"""Greedy decoding speed on the GPT-2 124M shape (random weights): ours with and without the KV
cache beside transformers' `generate`. Prints ms per decoding step, tokens/s (new tokens over wall
time), achieved GFLOP/s against the machine's matmul peak, and peak resident memory; each case runs
in its own process so that peak memory is its own.

    python benchmarks/generation.py [--new-tokens 128] [--prompt-len 64] [--batch 1 8] [--repeats 5] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import (  # benchmarks/ is this script's directory
    cpu_name,
    in_own_process,
    matmul_peak,
    peak_mib,
)
from train_step import BLOCK_MATMUL, N_LAYER, VOCAB, D

IMPLEMENTATIONS = ("transformers generate", "ours, KV cache", "ours, no cache")


def generation_flops(batch: int, prompt: int, new: int, cache: bool) -> float:
    """Matmul FLOPs of one call: the prompt once, then one position per new token (every position
    again without a cache); vocabulary logits at the last position of each step."""

    def forward(positions: int, context: int) -> float:
        return batch * (N_LAYER * (2 * BLOCK_MATMUL * positions + 4 * positions * context * D) + 2 * D * VOCAB)

    steps = [forward(prompt, prompt)]
    for i in range(1, new):
        context = prompt + i
        steps.append(forward(1, context) if cache else forward(context, context))
    return sum(steps)


def timed(fn, repeats: int, warmup) -> float:
    warmup()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(name: str, batch: int, prompt_len: int, new: int, repeats: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    prompt = torch.randint(0, 50257, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    if name == "transformers generate":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config()).eval().to(dtype)

        def fn(n=new):
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        from finetune import GPT, GPTConfig
        from finetune.inference.generate import generate

        model = GPT(GPTConfig.from_preset("gpt2")).eval().to(dtype)

        def fn(n=new):
            return generate(model, prompt, n, use_cache="no cache" not in name)
    with torch.inference_mode():  # the slow reference path: one timed run after a short warm-up
        seconds = timed(fn, 1, lambda: fn(4)) if "no cache" in name else timed(fn, repeats, fn)
    return {"seconds": seconds, "peak_mib": peak_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n = args.new_tokens
    if args.case:  # one measurement, in this fresh process
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.prompt_len, n, args.repeats, dtype)))
        return

    peak = matmul_peak(args.dtype)
    print(f"# greedy generation, GPT-2 124M shape, {args.dtype} weights, prompt {args.prompt_len}, {n} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}; "
          f"{args.dtype} matmul peak {peak:.0f} GFLOP/s")
    print("| implementation | batch | ms/step | tokens/s | GFLOP/s (% of matmul peak) | peak MiB | vs transformers |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        results = {}
        for name in IMPLEMENTATIONS[:2] if batch > 1 else IMPLEMENTATIONS:  # no cache: batch 1, the book's path
            result = in_own_process(__file__, "--case", name, str(batch), "--new-tokens", str(n), "--prompt-len",
                                    str(args.prompt_len), "--repeats", str(args.repeats), "--dtype", args.dtype)
            if isinstance(result, str):
                print(f"| {name} | {batch} | failed: {result} |")
                continue
            results[name] = result
        for name, r in results.items():
            rate = batch * n / r["seconds"]
            ratio = results["transformers generate"]["seconds"] / r["seconds"] if "transformers generate" in results else float("nan")
            gflops = generation_flops(batch, args.prompt_len, n, "no cache" not in name) / r["seconds"] / 1e9
            print(f"| {name} | {batch} | {1000 * r['seconds'] / n:.1f} | {rate:.1f} | {gflops:.0f} ({100 * gflops / peak:.0f}%) | "
                  f"{r['peak_mib']:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
