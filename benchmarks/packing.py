"""Instruction tuning with and without packing (`data.packing`, issue 34): target tokens trained per second.

The bundled 1,100 instructions at their real lengths (alpaca prompts, the training split), GPT-2 124M
shapes (random weights, dropout 0, all parameters, AdamW), batches drawn in a seeded random order as the
trainer draws them. Unpacked: 8 records per batch, padded to the longest. Packed: rows of up to 1,024
tokens (first fit, longest first), one row per step. Each case in a fresh process; a step is forward,
backward and the optimizer; the first step is a warm-up. `--trl` adds TRL's SFTTrainer on transformers' GPT-2
with the same shapes, texts (prompt and response, every token trained), optimizer and batch sizes, without and
with its packing (`packing=True`: best-fit decreasing into rows of 1,024 tokens, padding-free, positions
restarting per record), timed from the start of each step to the end of its optimizer step.

    python benchmarks/packing.py [--preset gpt2] [--steps 6] [--precision fp32 bf16] [--trl]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

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


def trl_case(preset: str, packing: bool, steps: int, precision: str) -> dict:
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune.checkpoints.atomic import write_directory
    from finetune.data.prompts import format_prompt
    from finetune.formats.transformers import tokenizer_files
    from finetune.model.gpt import GPTConfig
    from finetune.recipes.instruct import RECIPE, InstructConfig

    records = RECIPE.prepare(InstructConfig())["train"]
    texts = Dataset.from_dict({"text": [format_prompt("alpaca", r.instruction, r.input) + r.output for r in records]})
    ours = GPTConfig.from_preset(preset)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=ours.n_embd, n_layer=ours.n_layer, n_head=ours.n_head,
                                       n_positions=ours.context_length, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, attn_implementation="sdpa"))
    times, tokens, widths, started = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 1:  # the first is a warm-up
                times.append(time.perf_counter() - started[-1])

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= 1:
                labels = inputs["labels"][:, 1:]
                tokens.append(int((labels != -100).sum()))
                widths.append(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps + 1, per_device_train_batch_size=1 if packing else 8,
                         packing=packing, max_length=ours.context_length, learning_rate=1e-5, weight_decay=0.01,
                         lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
                         bf16=precision == "bf16", use_cpu=True, seed=0, dataloader_num_workers=0,
                         disable_tqdm=True)
        write_directory(Path(out) / "tokenizer", tokenizer_files(ours.context_length, pad=True))  # GPT-2's, as exported
        tokenizer = AutoTokenizer.from_pretrained(Path(out) / "tokenizer")
        Counting(model=model, args=args, train_dataset=texts, processing_class=tokenizer, callbacks=[Timer()]).train()
    return {
        "tokens_per_s": sum(tokens) / sum(times),
        "ms_per_step": 1000 * statistics.median(times),
        "targets_per_step": sum(tokens) / len(tokens),
        "padding": 1 - sum(tokens) / sum(widths),
        "rows": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--trl", action="store_true", help="add TRL's SFTTrainer without and with its packing")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # "packed-bf16", "trl:packed-bf16": one case, here
    args = parser.parse_args()
    if args.case:
        side, _, case = args.case.rpartition(":")
        kind, precision = case.split("-")
        run = trl_case if side == "trl" else one_case
        print(json.dumps(run(args.preset, kind == "packed", args.steps, precision)))
        return
    print(
        f"# instruction tuning steps on the bundled instructions, {args.preset} shapes (random weights), "
        f"{args.steps} steps after a warm-up, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{cpu_name()}, {date.today().isoformat()}"
    )
    from finetune.model.gpt import GPTConfig

    context = GPTConfig.from_preset(args.preset).context_length
    print("| side | precision | batches | target tokens/step | padding | ms/step | target tokens/s | vs our unpacked |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        rates = {}
        for side in ("finetune", "trl") if args.trl else ("finetune",):
            for kind in ("unpacked", "packed"):
                case = f"{'trl:' if side == 'trl' else ''}{kind}-{precision}"
                row = in_own_process(__file__, "--preset", args.preset, "--steps", str(args.steps), "--case", case)
                if isinstance(row, str):
                    sys.exit(f"the {side} {kind} {precision} case failed: {row}")
                rates[side, kind] = row["tokens_per_s"]
                shape = f"1 row of <= {context:,} tokens" if kind == "packed" else "8 records, padded to the longest"
                ratio = f"{rates[side, kind] / rates['finetune', 'unpacked']:.2f}x"
                print(
                    f"| {side} | {precision} | {shape} | {row['targets_per_step']:,.0f} | {row['padding']:.0%} | "
                    f"{row['ms_per_step']:,.0f} | {row['tokens_per_s']:,.0f} | {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
