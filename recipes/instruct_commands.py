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
    res = commands.add_parser("respond", help="write responses to instructions (an instruct run's test split, or --data FILE)")
    res.add_argument("model", help=MODEL_HELP)
    res.add_argument("--data", help="JSON/JSONL instruction records to respond to (default: the run's test split)")
    res.add_argument("--out", help="output JSONL (default: RUN_DIR/responses.jsonl, or responses-<data>.jsonl)")
    res.add_argument("--max-new-tokens", type=positive_int)
    res.add_argument("--bf16", action="store_true", help=BF16_HELP)
    res.set_defaults(func=run_respond)

    chat = commands.add_parser("chat", help="talk to an instruction-tuned model, one instruction per line")
    chat.add_argument("model", help=MODEL_HELP)
    chat.add_argument("--bf16", action="store_true", help=BF16_HELP)
    chat.set_defaults(func=run_chat)


MODEL_HELP = ("an instruct run directory, or any language model (checkpoint, transformers directory, PEFT adapter, "
              "hub id) prompted as the instruct recipe's defaults say (the book's Alpaca format)")


def instruct_model(target: str, bf16: bool):
    """The model and the instruct settings to prompt it with: a run's own, or the recipe's defaults."""
    from pathlib import Path

    from finetune.config import load_config
    from finetune.recipes.instruct import InstructConfig, instruct_run_config
    from finetune.runs import kept_checkpoint
    from finetune.weights import load_model, load_pretrained

    run_dir = Path(target)
    config = instruct_run_config(run_dir)
    if config is not None:
        model = load_model(kept_checkpoint(run_dir))[0]
    elif (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not an instruct run")
    else:
        config, model = load_config(InstructConfig, None), load_pretrained(target)
        if not hasattr(model, "lm_head"):
            raise UserError(f"{target}: a classifier; responding needs a language model")
    return weights_dtype(model, bf16), config


def run_respond(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.recipes.instruct import data_path, read_records, split_records, write_responses

    model, config = instruct_model(args.model, args.bf16)
    is_run = (Path(args.model) / "config.yaml").is_file()
    if not args.data and not is_run:
        raise UserError(f"{args.model} is not an instruct run, so it has no test split; give --data FILE")
    if args.max_new_tokens:
        config.generation.max_new_tokens = args.max_new_tokens
    where = Path(args.model) if is_run else Path(".")
    if args.data:
        records, out = read_records(Path(args.data), config.data), where / f"responses-{Path(args.data).stem}.jsonl"
    else:
        records, out = split_records(read_records(data_path(config.data), config.data), config.data)["test"], where / "responses.jsonl"
    out = Path(args.out) if args.out else out
    write_responses(model, records, config, out, quiet=False)
    print(f"{len(records)} responses written to {out}")


def run_chat(args: argparse.Namespace) -> None:
    from finetune.recipes.instruct import Record, respond

    model, config = instruct_model(args.model, args.bf16)
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
