"""Peak memory of preference tuning beside instruction tuning on the same shape: DPO keeps no second
(reference) model while it trains, so its peak should sit near instruction tuning's, not a model's
worth of weights above it. Each run (GPT-2 124M from a random init, a few steps of the same number of
sequences of the same length) goes in its own process, so that its peak resident memory is its own.

    python benchmarks/dpo_memory.py [--preset gpt2] [--pairs 4] [--max-length 128] [--records 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/ is this script's directory
    cpu_name,
    in_own_process,
    peak_mib,
)

CASES = [("instruct", "all"), ("dpo", "all"), ("instruct", "lora"), ("dpo", "lora")]


def one_run(recipe: str, trainable: str, preset: str, pairs: int, max_length: int, records: int) -> dict:
    from finetune.datasets import PREFERENCES, bundled

    from finetune.cli.main import main

    root = Path(tempfile.mkdtemp())
    data = root / "prefs.json"
    data.write_text(json.dumps(json.loads(bundled(PREFERENCES).read_text())[:records]))
    # The same sequences per step: DPO's batch of pairs holds a chosen and a rejected row for each.
    batch = pairs if recipe == "dpo" else 2 * pairs
    config = "dpo_tiny" if recipe == "dpo" else "instruct_tiny"
    start = time.perf_counter()
    code = main(["run", recipe, "--quiet", "--config", config, f"output_dir={root / 'run'}", f"data.path={data}",
                 f"model.name={preset}", "model.init=random", f"finetune.trainable={trainable}",
                 f"train.batch_size={batch}", "train.eval_every=0", "train.eval_at_start=false", "train.epochs=1",
                 f"data.max_length={max_length}", "generation.max_new_tokens=1"])
    if code != 0:
        raise SystemExit(f"{recipe} {trainable}: exit {code}")
    steps = sum(1 for line in (root / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    return {"peak_mib": peak_mib(), "seconds": time.perf_counter() - start, "steps": steps}


def weights_mib(preset: str) -> float:
    from finetune.model.gpt import GPT, GPTConfig

    return GPT(GPTConfig.from_preset(preset)).num_parameters() * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--pairs", type=int, default=4, help="DPO pairs per step (instruction tuning: twice as many sequences)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_run(*args.case, args.preset, args.pairs, args.max_length, args.records)))
        return
    print(f"# Peak memory, DPO beside instruction tuning: {args.preset} (random init), {2 * args.pairs} sequences "
          f"of up to {args.max_length} tokens a step, fp32, CPU: {cpu_name()}")
    print(f"# one copy of the weights: {weights_mib(args.preset):,.0f} MiB (what a reference model held in memory would add)")
    print("| recipe | trainable | peak RSS (MiB) | steps | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for recipe, trainable in CASES:
        result = in_own_process(__file__, "--preset", args.preset, "--pairs", str(args.pairs), "--max-length",
                                str(args.max_length), "--records", str(args.records), "--case", recipe, trainable)
        if isinstance(result, str):
            print(f"| {recipe} | {trainable} | failed: {result} | | |")
            continue
        print(f"| {recipe} | {trainable} | {result['peak_mib']:,.0f} | {result['steps']} | {result['seconds']:.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
