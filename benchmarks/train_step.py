"""Training steps on the GPT-2 124M shape (random weights), ours beside transformers (+ peft):
spam classification (batch 8 x 128) with full, last-block and LoRA (r=16 on every linear layer, head
included) fine-tuning, and instruction tuning (causal LM, full, batch 4 x 256).

Two settings. `same` (like with like): dropout 0 and the same AdamW (fused, weight decay on matrices
only) on both sides. `default`: each side as it comes: ours with dropout 0 and its trainer's fused
AdamW, transformers with its default dropout 0.1 and torch's default AdamW. Each case runs `--repeats`
times, each time in a fresh process (so peak memory is its own); a repeat is the median of `--steps`
timed steps after a warm-up. The table gives the median over repeats and the min-max spread. GFLOP/s
counts the matmul FLOPs of each step; its percentage is of the same run's rate on a GPT-2-shaped product
(1,024 tokens x 768 by 768 x 3,072: how close to the hardware a case runs; a square 2048 product is shown too).

    pip install -e ".[bench]"   # transformers and peft
    python benchmarks/train_step.py [--steps 5] [--repeats 3] [--setting same default] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import (  # benchmarks/ is this script's directory
    GPT2_MATMUL,
    cpu_name,
    in_own_process,
    matmul_peak,
    peak_mib,
)

METHODS = ("full", "last_block", "lora", "instruct")
SHAPES = {"full": (8, 128), "last_block": (8, 128), "lora": (8, 128), "instruct": (4, 256)}  # batch, length
BLOCK_MATMUL = 12 * 768 * 768  # qkv 3d², proj d², fc and proj 8d² per block (GPT-2 124M: d = 768)
N_LAYER, D, VOCAB = 12, 768, 50257


def step_flops(method: str, batch: int, length: int, implementation: str) -> float:
    """Matmul FLOPs the step executes (forward 2·params·tokens plus attention; backward as much again
    for input gradients and again for weight gradients, where needed). Our classifier runs its last
    block at the pooled position only: keys and values at every position, the rest at one per row."""
    tokens = batch * length
    block = 2 * BLOCK_MATMUL * tokens + 4 * batch * length * length * D  # projections + QKᵀ and AV
    last = block
    if implementation == "ours" and method != "instruct":
        last = 2 * 3 * D * D * tokens + 2 * 9 * D * D * batch + 4 * batch * length * D
    head = 2 * D * VOCAB * tokens if method == "instruct" else 0
    forward = (N_LAYER - 1) * block + last + head
    if method in ("full", "instruct"):
        return 3 * forward
    if method == "last_block":
        return forward + 2 * last
    return 2 * forward  # LoRA: input gradients through every block, tiny weight gradients


IMPLEMENTATIONS = ("ours", "transformers")


def build_ours(method: str) -> torch.nn.Module:
    from finetune import GPT, GPTConfig
    from finetune.model.classifier import GPTClassifier
    from finetune.model.lora import apply_lora
    from finetune.training.trainable import mark_trainable

    if method == "instruct":
        return GPT(GPTConfig.from_preset("gpt2"))
    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2")), num_classes=2)
    if method == "lora":
        apply_lora(model, rank=16, alpha=16, targets=["all-linear"])
    else:
        mark_trainable(model, "all" if method == "full" else "last_block")
    return model


def build_transformers(method: str, setting: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    dropout = {} if setting == "default" else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if method == "instruct":
        return GPT2LMHeadModel(GPT2Config(**dropout))

    model = GPT2ForSequenceClassification(GPT2Config(num_labels=2, pad_token_id=50256, **dropout))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "score"], fan_in_fan_out=True)
        return get_peft_model(model, config)
    if method == "last_block":
        model.requires_grad_(False)
        for module in (model.transformer.h[-1], model.transformer.ln_f, model.score):
            module.requires_grad_(True)
    return model


def run_case(implementation: str, method: str, steps: int, batch: int, length: int, precision: str,
             setting: str) -> dict:
    from finetune.training.optimizer import adamw

    torch.manual_seed(0)
    model = build_ours(method) if implementation == "ours" else build_transformers(method, setting)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if implementation == "transformers" and setting == "default":
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)  # torch's default, as a plain training loop
    else:
        optimizer = adamw(model, lr=1e-5, weight_decay=0.1)  # our trainer's: fused, decay on matrices only
    ids = torch.randint(0, 50256, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(2))

    targets = torch.roll(ids, -1, dims=1)
    from finetune.model.losses import next_token_loss

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if implementation == "ours" and method == "instruct":  # the instruct recipe's loss
                loss = next_token_loss(model, ids, targets) / targets.numel()
            elif implementation == "ours":
                loss = torch.nn.functional.cross_entropy(model(ids, mask).float(), labels)
            elif method == "instruct":
                loss = model(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
            else:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "ms": 1000 * statistics.median(times),
        "peak_mib": peak_mib(),
        "trainable": sum(p.numel() for p in trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", nargs="+", default=["same", "default"], choices=["same", "default"])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--case", nargs=4, metavar=("IMPL", "METHOD", "PRECISION", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this fresh process
        batch, length = SHAPES[args.case[1]]
        print(json.dumps(run_case(args.case[0], args.case[1], args.steps, batch, length, args.case[2], args.case[3])))
        return

    print(f"# training steps, GPT-2 124M shape, {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median of {args.repeats} processes x {args.steps} steps, [min-max] over the processes")
    print("| setting | method (batch x length) | precision | implementation | trainable params | ms/step [spread] | "
          "tokens/s | GFLOP/s (% of GPT-2-shaped matmul) | peak MiB | speed vs transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        square, peak = matmul_peak(precision, repeats=20), matmul_peak(precision, GPT2_MATMUL, repeats=20)
        print(f"| | matmul | {precision} | 2048 x 2048 x 2048 | | | | {square:.0f} ({100 * square / peak:.0f}%) | | |")
        print(f"| | matmul | {precision} | 1024 x 768 x 3072 (GPT-2-shaped) | | | | {peak:.0f} (100%) | | |")
        for setting in args.setting:
            for method in args.method:
                report(setting, method, precision, args, peak)


def report(setting: str, method: str, precision: str, args: argparse.Namespace, peak: float) -> None:
    batch, length = SHAPES[method]
    results = {}
    for implementation in IMPLEMENTATIONS:
        runs = [in_own_process(__file__, "--case", implementation, method, precision, setting, "--steps", str(args.steps))
                for _ in range(args.repeats)]
        failed = [r for r in runs if isinstance(r, str)]
        if failed:
            print(f"| {setting} | {method} | {precision} | {implementation} | failed: {failed[0]} |")
            continue
        ms = [r["ms"] for r in runs]
        results[implementation] = {"ms": statistics.median(ms), "low": min(ms), "high": max(ms),
                                   "peak_mib": max(r["peak_mib"] for r in runs), "trainable": runs[0]["trainable"]}
    for implementation, r in results.items():
        ratio = results["transformers"]["ms"] / r["ms"] if "transformers" in results else float("nan")
        gflops = step_flops(method, batch, length, implementation) / r["ms"] / 1e6
        print(f"| {setting} | {method} ({batch}x{length}) | {precision} | {implementation} | {r['trainable']:,} | "
              f"{r['ms']:.0f} [{r['low']:.0f}-{r['high']:.0f}] | {batch * length / r['ms'] * 1000:.0f} | "
              f"{gflops:.0f} ({100 * gflops / peak:.0f}%) | {r['peak_mib']:.0f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
