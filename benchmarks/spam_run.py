"""A complete spam run, ours beside a plain transformers loop doing the same work (issue 7, case d).

The book's chapter 6 settings (recipes/configs/spam.yaml) on GPT-2 124M with random weights: balanced
SMS data (1,045 train / 150 val / 299 test messages), 5 epochs of batch 8, last block + final norm +
head trained, validation every 50 steps and at each epoch end, then loss and accuracy on every
split. Both sides see the same batches in the same order, padded per batch and read at the last
real token. Wall time covers everything after the imports: building the model, training, evaluating,
writing the results. Ours also writes checkpoints, plots and the TF-IDF baseline.

    pip install -e ".[bench]"
    python benchmarks/spam_run.py [--precision fp32 bf16] [--epochs 5] [--implementation ours transformers]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch
from common import (  # benchmarks/ is this script's directory
    cpu_name,
    in_own_process,
    matmul_peak,
    peak_mib,
)

D, N_LAYER = 768, 12
BLOCK = 24 * D * D  # forward matmul FLOPs of one block per token (qkv 6d², proj 2d², MLP 16d²)


def spam_config(output_dir: str, epochs: int, precision: str):
    from finetune.recipes.spam import SpamConfig

    from finetune.config import load_config
    from finetune.training.registry import config_path

    config_file = config_path("spam")
    mixed = "bf16" if precision == "bf16" else "no"
    return load_config(SpamConfig, config_file, [f"output_dir={output_dir}", "model.init=random",
                                                 f"train.epochs={epochs}", f"train.mixed_precision={mixed}"])


def batches(lengths: list[int], epochs: int, batch_size: int, seed: int) -> list[list[int]]:
    """The training batches (as example lengths), in the trainer's order: a permutation per epoch from seed + epoch."""
    out = []
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out += [[lengths[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    return out


def padded(batch: list[int]) -> int:
    return len(batch) * max(batch)


def attention(batch: list[int], queries_per_row: int | None = None) -> int:
    """QKᵀ and AV FLOPs of one layer: every query (or `queries_per_row`) against every key."""
    width = max(batch)
    return 4 * len(batch) * (queries_per_row or width) * width * D


def run_flops(config, lengths: dict[str, list[int]], cached: bool) -> float:
    """Matmul FLOPs the run executes: uncached (every step runs the whole trunk, as transformers does)
    or ours (the frozen trunk once per example, the last block at the pooled position only)."""
    train = batches(lengths["train"], config.train.epochs, config.train.batch_size, config.train.seed)
    steps = len(train)
    evals = steps // config.train.eval_every + config.train.epochs
    val = [lengths["val"][k:k + 8] for k in range(0, len(lengths["val"]), 8)]
    final = [s[k:k + 8] for s in lengths.values() for k in range(0, len(s), 8)]

    def full_forward(b):
        return N_LAYER * (BLOCK * padded(b) + attention(b))

    if not cached:  # a training step: the whole forward, then the last block's backward (twice its forward)
        return (sum(full_forward(b) + 2 * (BLOCK * padded(b) + attention(b)) for b in train)
                + evals * sum(map(full_forward, val))
                + sum(map(full_forward, final)))

    def pooled(b, backward: bool):  # last block: qkv at every position, the rest at one position per row
        forward = BLOCK // 4 * padded(b) + BLOCK * 3 // 4 * len(b) + attention(b, 1)
        return 3 * forward if backward else forward

    def sorted_batches(s):
        s = sorted(s)
        return [s[k:k + 8] for k in range(0, len(s), 8)]

    cache = sum((N_LAYER - 1) * (BLOCK * padded(b) + attention(b)) for s in ("train", "val") for b in sorted_batches(lengths[s]))
    test = [lengths["test"][k:k + 8] for k in range(0, len(lengths["test"]), 8)]
    return (cache + sum(pooled(b, True) for b in train) + evals * sum(pooled(b, False) for b in val)
            + sum(pooled(b, False) for s in ("train", "val") for b in sorted_batches(lengths[s]))
            + sum(full_forward(b) for b in test))


def run_ours(config) -> dict:
    from finetune.recipes.spam import RECIPE

    from finetune.training.recipe import train

    metrics = train(RECIPE, config, quiet=True)
    return {"test_accuracy": metrics["test"]["accuracy"]}


def run_transformers(config) -> dict:
    """The same work as a plain PyTorch loop over transformers' GPT2ForSequenceClassification."""
    import torch.nn.functional as F
    from finetune.recipes.classification import encode_splits
    from finetune.recipes.spam import RECIPE
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from finetune.data.classification_inputs import Collate

    torch.manual_seed(config.train.seed)
    model = GPT2ForSequenceClassification(GPT2Config(num_labels=2, pad_token_id=50256))
    model.requires_grad_(False)
    for module in (model.transformer.h[-1], model.transformer.ln_f, model.score):
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.train.lr, weight_decay=config.train.weight_decay)
    data, _ = encode_splits(RECIPE.prepare(config), config, 1024)
    collate = Collate()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.mixed_precision == "bf16")

    def logits(batch):
        with autocast:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    @torch.no_grad()
    def evaluate(split: str) -> dict:
        model.eval()
        rows, size = list(data[split]), config.train.eval_batch_size or config.train.batch_size
        outputs, labels = [], []
        for k in range(0, len(rows), size):
            batch = collate(rows[k:k + size])
            outputs.append(logits(batch))
            labels.append(batch["labels"])
        outputs, labels = torch.cat(outputs), torch.cat(labels)
        model.train()
        return {"loss": F.cross_entropy(outputs, labels).item(), "accuracy": (outputs.argmax(-1) == labels).float().mean().item()}

    step = 0
    model.train()
    for epoch in range(config.train.epochs):
        order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(config.train.seed + epoch)).tolist()
        for k in range(0, len(order), config.train.batch_size):
            batch = collate([data["train"][i] for i in order[k:k + config.train.batch_size]])
            loss = F.cross_entropy(logits(batch), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.train.eval_every == 0:
                evaluate("val")
        if step % config.train.eval_every:
            evaluate("val")
    metrics = {split: evaluate(split) for split in ("train", "val", "test")}
    model.save_pretrained(config.output_dir)
    return {"test_accuracy": metrics["test"]["accuracy"]}


def split_lengths(config) -> dict[str, list[int]]:
    from finetune.recipes.classification import encode_splits
    from finetune.recipes.spam import RECIPE

    data, _ = encode_splits(RECIPE.prepare(config), config, 1024)
    return {split: [len(ids) for ids in encoded.ids] for split, encoded in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--implementation", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this fresh process
        with tempfile.TemporaryDirectory() as out:
            config = spam_config(out, args.epochs, args.case[1])
            start = time.perf_counter()
            result = (run_ours if args.case[0] == "ours" else run_transformers)(config)
            result["seconds"] = time.perf_counter() - start
        result["peak_mib"] = peak_mib()
        print(json.dumps(result))
        return

    config = spam_config("unused", args.epochs, "fp32")
    lengths = split_lengths(config)
    print(f"# complete spam run, GPT-2 124M shape (random weights), {args.epochs} epochs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}")
    print("| precision | implementation | wall s | GFLOP executed | GFLOP/s (% of matmul peak) | peak MiB | test acc | speed vs transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        peak = matmul_peak(precision)
        results = {}
        for implementation in args.implementation:
            result = in_own_process(__file__, "--case", implementation, precision, "--epochs", str(args.epochs))
            if isinstance(result, str):
                print(f"| {precision} | {implementation} | failed: {result} |")
                continue
            results[implementation] = result
        for implementation, r in results.items():
            flops = run_flops(config, lengths, cached=implementation == "ours")
            ratio = results["transformers"]["seconds"] / r["seconds"] if "transformers" in results else math.nan
            gflops = flops / r["seconds"] / 1e9
            print(f"| {precision} | {implementation} | {r['seconds']:.1f} | {flops / 1e9:,.0f} | {gflops:.0f} "
                  f"({100 * gflops / peak:.0f}%) | {r['peak_mib']:.0f} | {r['test_accuracy']:.2%} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
