"""The `finetune` command. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from finetune.errors import UserError

EXIT_USAGE = 2
DISTRIBUTION = "finetune-gpt2"  # the name on the package index; `finetune` there is another project
BF16_HELP = "bf16 weights: half the memory, faster decoding; tokens may differ slightly from fp32"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from finetune import build_model
    from finetune.generate import generate
    from finetune.tokenizer import EOT_ID, encode, get_tokenizer

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = _weights_dtype(build_model(args.model, args.init), args)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = encode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue")
    out = generate(
        model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p, EOT_ID, generator
    )[0]
    print(get_tokenizer().decode([t for t in out[len(prompt) :] if t != EOT_ID]))


def _weights_dtype(model, args: argparse.Namespace):
    """--bf16: half the memory, and faster decoding where the CPU or GPU computes in bf16."""
    import torch

    return model.to(torch.bfloat16) if args.bf16 else model


def _run(args: argparse.Namespace) -> None:
    from finetune.recipes import load_run_config, recipe
    from finetune.recipes.base import train

    config = load_run_config(args.recipe, args.config, args.overrides)
    train(recipe(config.recipe), config, quiet=args.quiet)


def _validate(args: argparse.Namespace) -> None:
    from finetune.recipes import load_run_config

    config = load_run_config(None, args.config, args.overrides)
    print(f"# {args.config}: valid {config.recipe} config")
    print(config.to_yaml(), end="")


def _eval(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from finetune.recipes import run_recipe
    from finetune.recipes.base import evaluate_run

    recipe = run_recipe(Path(args.run_dir))
    metrics = evaluate_run(recipe, Path(args.run_dir), tuple(args.split))
    print(json.dumps(metrics) if args.json else recipe.summary_table(metrics))


def _classify(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.checkpoint import load_model, resolve
    from finetune.recipes.classification import predict

    if any(not text.strip() for text in args.text):
        raise UserError("--text is empty; give a text to classify")
    model, meta = load_model(resolve(Path(args.checkpoint)))
    probs = predict(model, meta, args.text)
    for text, p in zip(args.text, probs):
        print(f"{meta['labels'][int(p.argmax())]}\t{float(p.max()):.4f}\t{text}")


def _predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.recipes.classification import predict_file

    rows = predict_file(Path(args.checkpoint), Path(args.data), Path(args.out), args.text_field, args.format,
                        args.delimiter, args.batch_size)
    print(f"{rows} predictions written to {args.out}")


def _merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.checkpoint import ADAPTER_CONFIG, load_model, model_files, write_directory
    from finetune.checkpoint import resolve as resolve_checkpoint
    from finetune.lora import merged_model

    source, out = resolve_checkpoint(Path(args.run_dir)), Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory for the merged checkpoint")
    if not (source / ADAPTER_CONFIG).exists():
        raise UserError(f"{source}: no adapter to merge (it is already a plain checkpoint)")
    model, meta = load_model(source)
    kept = {k: v for k, v in meta.items() if k in ("labels", "max_length")}  # no "base": the result stands alone
    write_directory(out, model_files(merged_model(model), kept))
    print(f"merged {source} into {out} (model.safetensors + config.json)")


def _respond(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.checkpoint import kept_checkpoint, load_model
    from finetune.config import load_config
    from finetune.recipes import run_recipe
    from finetune.recipes.instruct import InstructConfig, data_path, read_records, split_records, write_responses

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
    write_responses(_weights_dtype(model, args), records, config, out, quiet=False)
    print(f"{len(records)} responses written to {out}")


def _score(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from finetune.evals.generation import read_responses, reference_metrics
    from finetune.evals.judge import JudgeClient, judge_all
    from finetune.checkpoint import write_text_atomic
    from finetune.progress import progress
    from finetune.recipes.instruct import Record, format_prompt

    if bool(args.judge_url) != bool(args.judge_model):
        raise UserError("--judge-url and --judge-model go together")
    path = Path(args.responses)
    rows = read_responses(path)
    reference = reference_metrics([r["response"] for r in rows], [r["output"] for r in rows])
    summary = {k: v for k, v in reference.items() if k != "per_example"}
    per_example = [dict(r) for r in reference["per_example"]]
    if args.judge_url:
        client = JudgeClient(args.judge_url, args.judge_model, timeout=args.timeout, retries=args.retries)
        items = [{"prompt": format_prompt(Record(r["instruction"], r.get("input", ""), r["output"])).rstrip(),
                  "reference": r["output"], "response": r["response"]} for r in rows]
        judged, records = judge_all(client, items, lambda it: progress(it, "judging"))
        summary.update(judged)
        for example, record in zip(per_example, records):
            example.update(judge_score=record["score"], judge_error=record["error"])
        write_text_atomic(path.with_suffix(".judge.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(path.with_suffix(".scores.json"), json.dumps({**summary, "per_example": per_example}, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"n={summary['n']}  ROUGE-L={summary['rouge_l']:.4f}  exact match={summary['exact_match']:.2%}")
        if args.judge_url:
            mean = "n/a" if summary["judge_mean"] is None else f"{summary['judge_mean']:.1f}"
            print(f"judge {args.judge_model}: mean {mean} over {summary['judge_scored']} scored, {summary['judge_failed']} failed")
        print(f"details in {path.with_suffix('.scores.json')}")


def _chat(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.checkpoint import kept_checkpoint, load_model
    from finetune.config import load_config
    from finetune.recipes import run_recipe
    from finetune.recipes.instruct import InstructConfig, Record, respond

    run_dir = Path(args.run_dir)
    if run_recipe(run_dir).name != "instruct":
        raise UserError(f"{run_dir}: not an instruct run")
    config = load_config(InstructConfig, run_dir / "config.yaml")
    model = _weights_dtype(load_model(kept_checkpoint(run_dir))[0], args)
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


def _recipes(args: argparse.Namespace) -> None:
    from finetune.recipes import RECIPES, presets

    found = presets()
    width = max(len(p.name) for p in found)
    for recipe in RECIPES:
        print(f"{recipe}:")
        for preset in (p for p in found if p.recipe == recipe):
            print(f"  {preset.name:<{width}}  {preset.purpose}")
    print("run one with: finetune run RECIPE --config PRESET [key=value ...]")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version(DISTRIBUTION)} (distribution {DISTRIBUTION})"
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="continue a prompt with a GPT-2 model")
    gen.add_argument("--model", default="gpt2", help="preset, hub id, checkpoint directory or book .pth")
    gen.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--bf16", action="store_true", help=BF16_HELP)
    gen.set_defaults(func=_generate)

    run = commands.add_parser("run", help="train a recipe: finetune run spam [--config FILE] [key=value ...]")
    run.add_argument("recipe", help="recipe name (see `finetune recipes`)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    run.add_argument("--config", help="preset name (see `finetune recipes`) or YAML file; default: the preset named after the recipe")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    run.set_defaults(func=_run)

    val = commands.add_parser("validate", help="check a config file without running it")
    val.add_argument("config", help="preset name or YAML file")
    val.add_argument("overrides", nargs="*", metavar="key=value")
    val.set_defaults(func=_validate)

    ev = commands.add_parser("eval", help="re-evaluate a run's kept checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--split", nargs="+", default=["test"], choices=["train", "val", "test"])
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.set_defaults(func=_eval)

    cls = commands.add_parser("classify", help="label texts with a trained classifier")
    cls.add_argument("checkpoint", help="run directory or checkpoint directory")
    cls.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    cls.set_defaults(func=_classify)

    pred = commands.add_parser("predict", help="classify every text of a file: one CSV row per input with every "
                                               "class's probability")
    pred.add_argument("checkpoint", help="run directory or checkpoint directory")
    pred.add_argument("--data", required=True, help="CSV, TSV, JSON, JSONL, Parquet or raw label<TAB>text file")
    pred.add_argument("--out", required=True, help="CSV file to write (must not exist)")
    pred.add_argument("--text-field", help="column holding the text (default: the run's data.text_field, or 'text')")
    pred.add_argument("--format", choices=["csv", "tsv", "json", "jsonl", "parquet", "raw"], help="default: from the extension")
    pred.add_argument("--delimiter", help="CSV/TSV field separator")
    pred.add_argument("--batch-size", type=_positive_int, default=32)
    pred.set_defaults(func=_predict)

    merge = commands.add_parser("merge", help="fold a run's adapter (LoRA, or the layers a partial fine-tune trained) into its base: a plain checkpoint")
    merge.add_argument("run_dir", help="run directory or adapter checkpoint directory")
    merge.add_argument("out_dir", help="new directory for model.safetensors + config.json")
    merge.set_defaults(func=_merge)

    res = commands.add_parser("respond", help="write an instruct run's responses (test split, or --data FILE)")
    res.add_argument("run_dir")
    res.add_argument("--data", help="JSON/JSONL instruction records to respond to (default: the run's test split)")
    res.add_argument("--out", help="output JSONL (default: RUN_DIR/responses.jsonl or responses-<data>.jsonl)")
    res.add_argument("--max-new-tokens", type=_positive_int)
    res.add_argument("--bf16", action="store_true", help=BF16_HELP)
    res.set_defaults(func=_respond)

    score = commands.add_parser("score", help="score a responses.jsonl: ROUGE-L, exact match, optional LLM judge")
    score.add_argument("responses")
    score.add_argument("--judge-url", help="Ollama /api/chat or OpenAI-compatible /v1/chat/completions endpoint")
    score.add_argument("--judge-model", help="model name at that endpoint, e.g. llama3")
    score.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request")
    score.add_argument("--retries", type=int, default=2, help="retries after a timeout or server error")
    score.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    score.set_defaults(func=_score)

    chat = commands.add_parser("chat", help="talk to an instruct run, one instruction per line")
    chat.add_argument("run_dir")
    chat.add_argument("--bf16", action="store_true", help=BF16_HELP)
    chat.set_defaults(func=_chat)

    rec = commands.add_parser("recipes", help="list recipes and their preset configs")
    rec.set_defaults(func=_recipes)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"finetune: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the caller's warning handling afterwards
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and hasattr(args, "overrides") and not any(u.startswith("-") for u in unknown):
            args.overrides += unknown  # key=value overrides given after an option; checked with the config
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse has printed its one line (or --help); return, do not raise
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    from finetune.trainer import Interrupted

    try:
        args.func(args)
    except Interrupted as e:
        print(f"finetune: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"finetune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
