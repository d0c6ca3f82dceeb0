"""The `finetune` command. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import import_module

from finetune.errors import UserError

EXIT_USAGE = 2
DISTRIBUTION = "finetune-gpt2"  # the name on the package index; `finetune` there is another project
COMMAND_MODULES = ("finetune.recipes.classification_commands", "finetune.recipes.instruct_commands",
                   "finetune.evals.commands")
BF16_HELP = "bf16 weights: half the memory, faster decoding; tokens may differ slightly from fp32"


def positive_int(text: str) -> int:
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
    model = weights_dtype(build_model(args.model, args.init), args.bf16)
    if not hasattr(model, "lm_head"):
        raise UserError(f"{args.model}: a classifier; generate needs a language model (use finetune classify)")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = encode(args.prompt)
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue")
    out = generate(
        model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p, EOT_ID, generator
    )[0]
    print(get_tokenizer().decode([t for t in out[len(prompt) :] if t != EOT_ID]))


def weights_dtype(model, bf16: bool):
    """--bf16: half the memory, and faster decoding where the CPU or GPU computes in bf16."""
    import torch

    return model.to(torch.bfloat16) if bf16 else model


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
    metrics = evaluate_run(recipe, Path(args.run_dir), tuple(args.split), args.model)
    print(json.dumps(metrics) if args.json else recipe.summary_table(metrics))


def _merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.weights import merge_adapter

    source = merge_adapter(Path(args.run_dir), Path(args.out_dir))
    print(f"merged {source} into {args.out_dir} (model.safetensors + config.json)")


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from finetune.export import export

    source = export(Path(args.source), Path(args.out_dir), args.format)
    print(f"exported {source} to {args.out_dir} ({args.format})")


def _serve(args: argparse.Namespace) -> None:
    from finetune.server import serve

    serve(args.model, args.init, args.host, args.port, args.api_key, args.bf16, args.max_batch)


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
    gen.add_argument("--model", default="gpt2", help="preset, hub id, run or checkpoint directory, PEFT adapter, or book .pth")
    gen.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=positive_int, default=50)
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
    ev.add_argument("--model", help="evaluate this model on the run's data instead (a PEFT adapter, an export, a checkpoint)")
    ev.set_defaults(func=_eval)

    merge = commands.add_parser("merge", help="fold a run's adapter (LoRA, or the layers a partial fine-tune trained) into its base: "
                                              "a plain finetune checkpoint (for other tools: finetune export)")
    merge.add_argument("run_dir", help="run directory or adapter checkpoint directory")
    merge.add_argument("out_dir", help="new directory for model.safetensors + config.json")
    merge.set_defaults(func=_merge)

    exp = commands.add_parser("export", help="write a run's model for transformers (merged) or peft (a LoRA run's adapter)")
    exp.add_argument("source", help="run directory or checkpoint directory")
    exp.add_argument("out_dir", help="new directory to write")
    exp.add_argument("--format", choices=["transformers", "peft"], default="transformers",
                     help="transformers: a model from_pretrained loads, adapters merged in; peft: the LoRA adapter on its base")
    exp.set_defaults(func=_export)

    srv = commands.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a page to try it at /")
    srv.add_argument("model", help="anything generate or classify takes: run, checkpoint, PEFT adapter, hub id, preset")
    srv.add_argument("--init", choices=["pretrained", "random"], default="pretrained")
    srv.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) serves this machine only")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API request")
    srv.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together")
    srv.add_argument("--bf16", action="store_true", help=BF16_HELP)
    srv.set_defaults(func=_serve)

    for module in COMMAND_MODULES:  # the recipes' and evals' own commands
        import_module(module).add_commands(commands)

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
