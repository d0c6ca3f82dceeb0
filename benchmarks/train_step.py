"""Spam-classification training step on the GPT-2 124M shape (random weights, batch 8 x 128 tokens):
full, last-block and LoRA (r=16 on every linear layer, head included) fine-tuning, ours beside
transformers (+ peft). Prints median ms/step and peak resident memory; each case runs in its own
process so that peak memory is its own.

    pip install peft            # for the transformers + peft LoRA case
    python benchmarks/train_step.py [--steps 5] [--batch 8] [--length 128] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("full", "last_block", "lora")
IMPLEMENTATIONS = ("ours", "transformers")


def build_ours(method: str) -> torch.nn.Module:
    from finetune import GPT, GPTConfig
    from finetune.classifier import GPTClassifier
    from finetune.lora import apply_lora
    from finetune.trainable import mark_trainable

    model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2")), num_classes=2)
    if method == "lora":
        apply_lora(model, rank=16, alpha=16, targets=["all-linear"])
    else:
        mark_trainable(model, "all" if method == "full" else "last_block")
    return model


def build_transformers(method: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(num_labels=2, pad_token_id=50256))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "score"], fan_in_fan_out=True)
        return get_peft_model(model, config)
    if method == "last_block":
        model.requires_grad_(False)
        for module in (model.transformer.h[-1], model.transformer.ln_f, model.score):
            module.requires_grad_(True)
    return model


def run_case(implementation: str, method: str, steps: int, batch: int, length: int, precision: str) -> dict:
    torch.manual_seed(0)
    model = (build_ours if implementation == "ours" else build_transformers)(method).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, 50256, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(2))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if implementation == "ours":
                loss = torch.nn.functional.cross_entropy(model(ids, mask).float(), labels)
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
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "METHOD", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this fresh process
        print(json.dumps(run_case(args.case[0], args.case[1], args.steps, args.batch, args.length, args.case[2])))
        return

    print(f"# spam training step, GPT-2 124M shape, batch {args.batch} x {args.length}, median of {args.steps} steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}")
    print("| method | precision | implementation | trainable params | ms/step | peak MiB | speed vs transformers |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precision:
        for method in args.method:
            results = {}
            for implementation in IMPLEMENTATIONS:
                command = [sys.executable, __file__, "--case", implementation, method, precision,
                           "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {method} | {precision} | {implementation} | failed: {done.stderr.strip().splitlines()[-1]} |")
                    continue
                results[implementation] = json.loads(done.stdout.strip().splitlines()[-1])
            for implementation, r in results.items():
                ratio = results["transformers"]["ms"] / r["ms"] if "transformers" in results else float("nan")
                print(f"| {method} | {precision} | {implementation} | {r['trainable']:,} | {r['ms']:.0f} | "
                      f"{r['peak_mib']:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
