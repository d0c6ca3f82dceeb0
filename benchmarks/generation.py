"""Greedy decoding speed on the GPT-2 124M shape (random weights): ours with and without the KV
cache beside transformers' `generate`. Prints a table of tokens/s (new tokens over wall time).

    python benchmarks/generation.py [--new-tokens 128] [--prompt-len 64] [--batch 1 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune import GPT, GPTConfig
    from finetune.generate import generate

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval().to(dtype)
    ours = GPT(GPTConfig.from_preset("gpt2")).eval().to(dtype)
    n = args.new_tokens

    print(f"# greedy generation, GPT-2 124M shape, {args.dtype} weights, prompt {args.prompt_len}, {n} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"| {'implementation':<26} | batch | tokens/s | vs transformers |")
    print(f"|{'-' * 28}|-------|----------|-----------------|")
    for batch in args.batch:
        prompt = torch.randint(0, 50257, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        cases = {
            "transformers generate": lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0),
            "ours, KV cache": lambda: generate(ours, prompt, n),
            "ours, no cache": lambda: generate(ours, prompt, n, use_cache=False),
        }
        rates = {}
        with torch.inference_mode():
            for name, fn in cases.items():
                rates[name] = batch * n / timed(fn, args.repeats if "no cache" not in name else 1)
        for name, rate in rates.items():
            ratio = rate / rates["transformers generate"]
            print(f"| {name:<26} | {batch:>5} | {rate:>8.1f} | {ratio:>14.2f}x |")


if __name__ == "__main__":
    main()
