"""Instruction tuning with and without packing (`data.packing`, issue 34): target tokens trained per second.

The bundled 1,100 instructions at their real lengths (alpaca prompts, the training split), GPT-2 124M
shapes (random weights, dropout 0, all parameters, AdamW), batches drawn in a seeded random order as the
trainer draws them. Unpacked: 8 records per batch, padded to the longest. Packed: rows of up to 1,024
tokens (first fit, longest first), one row per step. Each case in a fresh process; a step is forward,
backward and the optimizer; the first step is a warm-up.

    python benchmarks/packing.py [--preset gpt2] [--steps 6] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import date

import torch
from common import cpu_name, in_own_process  # benchmarks/ is this script's directory


def one_case(preset: str, packing: bool, steps: int, precision: str) -> dict:
    from finetune.model.gpt import GPT, GPTConfig
    from finetune.model.losses import IGNORE, next_token_loss
    from finetune.recipes.instruct import RECIPE, Collate, InstructConfig, PackedCollate, encode, packed

    examples = encode(RECIPE.prepare(InstructConfig())["train"], "alpaca")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    length = model.config.context_length
    if packing:
        items, collate, per_step = packed(examples, length), PackedCollate(Collate(length)), 1
    else:
        items, collate, per_step = list(examples), Collate(length), 8
    random.Random(0).shuffle(items)
    times, tokens, widths = [], [], []
    for step in range(steps + 1):
        batch = collate(items[step * per_step : (step + 1) * per_step])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = next_token_loss(
                model, batch["input_ids"], batch["targets"], batch.get("positions"), batch.get("segments")
            )
        (loss / batch["count"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
            tokens.append(int((batch["targets"] != IGNORE).sum()))
            widths.append(batch["input_ids"].numel())
    return {
        "tokens_per_s": sum(tokens) / sum(times),
        "ms_per_step": 1000 * statistics.median(times),
        "targets_per_step": sum(tokens) / len(tokens),
        "padding": 1 - sum(tokens) / sum(widths),
        "rows": len(items),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # "packed-bf16" etc.: one case, in this process
    args = parser.parse_args()
    if args.case:
        kind, precision = args.case.split("-")
        print(json.dumps(one_case(args.preset, kind == "packed", args.steps, precision)))
        return
    print(
        f"# instruction tuning steps on the bundled instructions, {args.preset} shapes (random weights), "
        f"{args.steps} steps after a warm-up, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{cpu_name()}, {date.today().isoformat()}"
    )
    print("| precision | batches | target tokens/step | padding | ms/step | target tokens/s | packed vs not |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precision:
        rates = {}
        for kind in ("unpacked", "packed"):
            row = in_own_process(
                __file__, "--preset", args.preset, "--steps", str(args.steps), "--case", f"{kind}-{precision}"
            )
            if isinstance(row, str):
                sys.exit(f"the {kind} {precision} case failed: {row}")
            rates[kind] = row["tokens_per_s"]
            shape = "1 row of <= 1,024 tokens" if kind == "packed" else "8 records, padded to the longest"
            ratio = f"{rates[kind] / rates['unpacked']:.2f}x"
            print(
                f"| {precision} | {shape} | {row['targets_per_step']:,.0f} | {row['padding']:.0%} | "
                f"{row['ms_per_step']:,.0f} | {row['tokens_per_s']:,.0f} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
