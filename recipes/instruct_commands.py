"""The instruction recipe's commands: `finetune respond` (responses to a file or the test split) and
`finetune chat` (one instruction per line).

Parsing needs nothing heavy; the recipe (and torch) is imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import BF16_HELP, positive_int, weights_dtype
from finetune.errors import UserError


def add_commands(commands) -> None:
    res = commands.add_parser("respond", help="write an instruct run's responses (test split, or --data FILE)")
    res.add_argument("run_dir")
    res.add_argument("--data", help="JSON/JSONL instruction records to respond to (default: the run's test split)")
    res.add_argument("--out", help="output JSONL (default: RUN_DIR/responses.jsonl or responses-<data>.jsonl)")
    res.add_argument("--max-new-tokens", type=positive_int)
    res.add_argument("--bf16", action="store_true", help=BF16_HELP)
    res.set_defaults(func=run_respond)

    chat = commands.add_parser("chat", help="talk to an instruct run, one instruction per line")
    chat.add_argument("run_dir")
    chat.add_argument("--bf16", action="store_true", help=BF16_HELP)
    chat.set_defaults(func=run_chat)


def run_respond(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.config import load_config
    from finetune.recipes import run_recipe
    from finetune.recipes.instruct import InstructConfig, data_path, read_records, split_records, write_responses
    from finetune.runs import kept_checkpoint
    from finetune.weights import load_model

    run_dir = Path(args.run_dir)
    config = load_config(InstructConfig, run_dir / "config.yaml") if run_recipe(run_dir).name == "instruct" else None
    if config is None:
        raise UserError(f"{run_dir}: not an instruct run")
    if args.max_new_tokens:
        config.generation.max_new_tokens = args.max_new_tokens
    if args.data:
        records, out = read_records(Path(args.data), config.data), run_dir / f"responses-{Path(args.data).stem}.jsonl"
    else:
        records, out = split_records(read_records(data_path(config.data), config.data), config.data)["test"], run_dir / "responses.jsonl"
    out = Path(args.out) if args.out else out
    model, _ = load_model(kept_checkpoint(run_dir))
    write_responses(weights_dtype(model, args), records, config, out, quiet=False)
    print(f"{len(records)} responses written to {out}")


def run_chat(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.config import load_config
    from finetune.recipes import run_recipe
    from finetune.recipes.instruct import InstructConfig, Record, respond
    from finetune.runs import kept_checkpoint
    from finetune.weights import load_model

    run_dir = Path(args.run_dir)
    if run_recipe(run_dir).name != "instruct":
        raise UserError(f"{run_dir}: not an instruct run")
    config = load_config(InstructConfig, run_dir / "config.yaml")
    model = weights_dtype(load_model(kept_checkpoint(run_dir))[0], args)
    print("Type an instruction (optionally 'instruction || input'); an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        instruction, _, extra = line.partition("||")
        try:
            print(respond(model, [Record(instruction.strip(), extra.strip(), "")], config)[0])
        except UserError as e:  # a too-long prompt ends this turn, not the session
            print(f"finetune: error: {e}", file=sys.stderr)
