"""Peak memory and time of a training step with and without activation checkpointing (issue 34).

One forward and backward pass of the whole model (every parameter trained, or with --lora rank-16 adapters on
every block's linear layers; random weights, dropout 0, fp32), each case in a fresh process so that its peak
resident memory is its own. The optimizer's state is the same with and without checkpointing, so it is left
out: the difference is the activations. Checkpointing lowers the peak only where activations outweigh the
gradients: the peak of a full step comes at the end of its backward pass, when every gradient exists and the
activations are freed, with or without checkpointing.

    python benchmarks/activation_checkpointing.py [--preset gpt2-xl] [--batch 1] [--length 1024] [--lora]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import torch
from common import cpu_name, in_own_process, peak_mib  # benchmarks/ is this script's directory


def one_case(preset: str, batch: int, length: int, checkpointing: bool, lora: bool) -> dict:
    from finetune.model.gpt import GPT, GPTConfig
    from finetune.model.lora import apply_lora
    from finetune.model.losses import next_token_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).train()
    if lora:
        apply_lora(model, 16, 32, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"])
    model.activation_checkpointing = checkpointing
    weights = peak_mib()
    ids = torch.randint(0, model.config.vocab_size, (batch, length + 1))
    start = time.perf_counter()
    next_token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_mib(), "weights_mib": weights,
            "parameters": model.num_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-xl")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--lora", action="store_true", help="train rank-16 LoRA adapters instead of every weight")
    parser.add_argument("--case", choices=["on", "off"], help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.preset, args.batch, args.length, args.case == "on", args.lora)))
        return
    trained = "LoRA rank 16 on every block linear" if args.lora else "all parameters"
    print(f"# one training step (forward + backward, fp32, {trained}) of {args.preset} (random weights), "
          f"{args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{cpu_name()}, {date.today().isoformat()}")
    print("| activation checkpointing | peak RSS MiB | after building the model MiB | step s |")
    print("|---|---|---|---|")
    rows = {}
    for case in ("off", "on"):
        row = rows[case] = in_own_process(__file__, "--preset", args.preset, "--batch", str(args.batch),
                                          "--length", str(args.length), "--case", case, *(["--lora"] if args.lora else []))
        if isinstance(row, str):
            sys.exit(f"the {case} case failed: {row}")
        print(f"| {case} | {row['peak_mib']:,.0f} | {row['weights_mib']:,.0f} | {row['seconds']:.1f} |", flush=True)
    off, on = rows["off"], rows["on"]
    saved = off["peak_mib"] - on["peak_mib"]
    print(f"\ncheckpointing: peak {saved:,.0f} MiB lower ({on['peak_mib'] / off['peak_mib']:.2f}x), "
          f"step {on['seconds'] / off['seconds']:.2f}x the time")


if __name__ == "__main__":
    main()
