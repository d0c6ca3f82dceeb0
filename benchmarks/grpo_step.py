"""One GRPO step (rollouts, rewards, one policy update), ours beside TRL's GRPOTrainer, on the same model
shape (random weights), the same prompts (bundled arithmetic questions), group size and completion length.

    python benchmarks/grpo_step.py                         # gpt2-tiny shapes, 4 prompts x 8 completions x 16 tokens
    python benchmarks/grpo_step.py --model gpt2 --steps 4  # GPT-2 124M shapes

Each implementation runs in a fresh process (its peak memory is its own), takes `--warmup` steps, then
the median of `--steps` timed steps. Completions run to `--tokens` in both (a random model almost never
ends early), and neither computes a KL term (beta 0, both defaults). TRL needs the bench extra
(`pip install "finetune-gpt2[bench]"`, which brings trl). The book's chapter 6 loop (rasbt/
reasoning-from-scratch) is written for Qwen3 and is not timed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, in_own_process, peak_mib  # noqa: E402

PROMPT = "<|user|>\n{question}\n<|assistant|>:\n"  # the phi3 prompt style


def questions(n: int) -> list[dict]:
    from finetune.datasets import ARITHMETIC, bundled

    rows = [json.loads(line) for line in bundled(ARITHMETIC).read_text().splitlines()[:n]]
    return [{"question": r["instruction"], "answer": r["answer"]} for r in rows]


def number_reward(completions, answer, **_):
    from finetune.recipes.rewards import last_number

    return [float(last_number(c) == float(a)) for c, a in zip(completions, answer, strict=True)]


def run_ours(model_name: str, prompts: int, group: int, tokens: int, steps: int) -> list[float]:
    from finetune.data.records import Record
    from finetune.formats.loading import build_model
    from finetune.recipes.grpo_task import GRPOSection, GRPOTask, Prompt, ask
    from finetune.recipes.rewards import Rewards, RewardSpec
    from finetune.training.optimizer import adamw

    torch.manual_seed(0)
    model = build_model(model_name, "random")
    settings = GRPOSection(group_size=group, max_new_tokens=tokens, loss_type="dapo")
    rewards = Rewards([RewardSpec(kind="number", column="answer")], ["instruction", "answer"])
    task = GRPOTask(settings, rewards, None, seed=0)
    rows = questions(prompts * steps)
    asked = ask([Prompt(Record(r["question"]), {"answer": r["answer"]}, f"q{i}") for i, r in enumerate(rows)],
                "phi3", model, settings)
    optimizer = adamw(model, 1e-6, 0.0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            batch = task.rollout(model, [{"asked": asked[step * prompts : (step + 1) * prompts]}])[0]
        model.train()
        loss = task.loss(model, batch)["loss"] / batch["count"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def run_trl(model_name: str, prompts: int, group: int, tokens: int, steps: int) -> list[float]:
    import tempfile

    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from finetune.formats.transformers import tokenizer_files
    from finetune.model.gpt import GPTConfig

    files = Path(tempfile.mkdtemp())
    for name, write in tokenizer_files(1024, pad=True).items():  # GPT-2's tokenizer, as our exports write it
        write(files / name)
    tokenizer = AutoTokenizer.from_pretrained(files)
    ours = GPTConfig.from_preset(model_name)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=ours.n_embd, n_layer=ours.n_layer, n_head=ours.n_head,
                                       n_positions=ours.context_length, vocab_size=ours.vocab_size))
    data = Dataset.from_list([{"prompt": PROMPT.format(question=r["question"]), "answer": r["answer"]}
                              for r in questions(prompts * steps)])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir="/tmp/grpo-bench-trl", per_device_train_batch_size=prompts * group, num_generations=group,
        max_completion_length=tokens, max_steps=steps, learning_rate=1e-6, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="no", temperature=1.0, loss_type="dapo", beta=0.0, seed=0,
        dataloader_num_workers=0, shuffle_dataset=False, gradient_checkpointing=False,  # like ours: no recomputation
    )
    trainer = GRPOTrainer(model=model, reward_funcs=number_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return [end - begin for begin, end in zip(stamps[::2], stamps[1::2], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--case", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.model, args.prompts, args.group, args.tokens, args.warmup + args.steps)
    if args.case:
        run = run_ours if args.case == "ours" else run_trl
        times = run(*shape)[args.warmup :]
        print(json.dumps({"ms": 1000 * statistics.median(times), "peak_mib": peak_mib()}))
        return
    torch.set_num_threads(torch.get_num_threads())
    print(f"GRPO step: {args.model} shapes, {args.prompts} prompts x {args.group} completions x {args.tokens} tokens, "
          f"median of {args.steps} steps after {args.warmup}; {cpu_name()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    found = {}
    flags = ["--model", args.model, "--prompts", str(args.prompts), "--group", str(args.group), "--tokens",
             str(args.tokens), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for case in ("ours", "trl"):
        found[case] = in_own_process(__file__, *flags, "--case", case)
    print(f"| {'implementation':<16} | {'ms per step':>11} | {'peak MiB':>8} |")
    print(f"| {'-' * 16} | {'-' * 11} | {'-' * 8} |")
    for case, result in found.items():
        if isinstance(result, str):
            print(f"| {case:<16} | failed: {result}")
        else:
            print(f"| {case:<16} | {result['ms']:>11.0f} | {result['peak_mib']:>8.0f} |")
    if all(isinstance(r, dict) for r in found.values()):
        print(f"ours is {found['trl']['ms'] / found['ours']['ms']:.2f}x TRL's speed")  # type: ignore[index]


if __name__ == "__main__":
    main()
