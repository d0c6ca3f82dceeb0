"""Commands that train, re-evaluate and compare: `run`, `validate`, `eval`, `recipes`, `config`, `runs`
and `sweep`. Recipes are found
through their entry points (`finetune.training.registry`); parsing needs nothing heavy."""

from __future__ import annotations

import argparse


def add_commands(commands) -> None:
    run = commands.add_parser("run", help="train a recipe: finetune run spam [--config FILE] [key=value ...]")
    run.add_argument("recipe", help="recipe name (see `finetune recipes`)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    run.add_argument(
        "--config", help="preset name (see `finetune recipes`) or YAML file; default: the preset named after the recipe"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    run.set_defaults(func=run_recipe)

    val = commands.add_parser("validate", help="check a config file without running it")
    val.add_argument("config", help="preset name or YAML file")
    val.add_argument("overrides", nargs="*", metavar="key=value")
    val.set_defaults(func=run_validate)

    ev = commands.add_parser("eval", help="re-evaluate a run's kept checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--split", nargs="+", default=["test"], choices=["train", "val", "test"])
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.add_argument(
        "--model", help="evaluate this model on the run's data instead (a PEFT adapter, an export, a checkpoint)"
    )
    ev.set_defaults(func=run_eval)

    rec = commands.add_parser("recipes", help="list recipes and their preset configs")
    rec.set_defaults(func=run_list)

    ref = commands.add_parser("config", help="every config key of a recipe: type, default and what it does")
    ref.add_argument("recipe", help="recipe name (see `finetune recipes`)")
    ref.add_argument("--markdown", action="store_true", help="as the docs' reference page")
    ref.set_defaults(func=run_config_reference)

    runs = commands.add_parser("runs", help="compare the runs under a directory in one table")
    runs.add_argument("directory", nargs="?", default="runs", help="where to look for runs (default: runs)")
    runs.add_argument("--sort", help="a column to sort by, e.g. test.accuracy or val.loss")
    runs.add_argument("--descending", action="store_true", help="largest first")
    out = runs.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON list")
    out.add_argument("--csv", action="store_true", help="CSV")
    runs.set_defaults(func=run_runs)

    sw = commands.add_parser("sweep", help="search config values of a recipe with Optuna; every trial is a run")
    sw.add_argument("recipe", nargs="?", help="recipe name (or give --spec)")
    sw.add_argument(
        "params",
        nargs="*",
        metavar="key=values",
        help="swept settings: key=[a,b,c], or key=uniform(lo,hi) / loguniform(lo,hi) / int(lo,hi)",
    )
    sw.add_argument(
        "--spec",
        help="a sweep file (YAML: recipe, config, overrides, parameters, metric, direction, ...) "
        "or a bundled one by name, e.g. spam_ablation",
    )
    sw.add_argument("--config", help="the preset or YAML file every trial starts from")
    sw.add_argument("--set", action="append", default=[], metavar="key=value", help="a fixed override for every trial")
    sw.add_argument("--metric", help="val.NAME or test.NAME, e.g. val.accuracy")
    sw.add_argument("--direction", choices=["max", "min"])
    sw.add_argument("--sampler", choices=["grid", "random", "tpe"])
    sw.add_argument("--trials", type=int, help="trials to run (random, tpe)")
    sw.add_argument("--out", help="the sweep directory (default: runs/sweep-RECIPE)")
    sw.add_argument("--storage", help="an Optuna storage URL several machines can share (default: SQLite in --out)")
    sw.add_argument("--parallel", type=int, default=1, help="trials run at once on this machine")
    sw.add_argument("--worker", help=argparse.SUPPRESS)  # a worker process of --parallel: its grid points
    sw.set_defaults(func=run_sweep_command)


def run_recipe(args: argparse.Namespace) -> None:
    from finetune.training.recipe import train
    from finetune.training.registry import load_run_config, recipe

    config = load_run_config(args.recipe, args.config, args.overrides)
    train(recipe(config.recipe), config, quiet=args.quiet)


def run_validate(args: argparse.Namespace) -> None:
    from finetune.training.registry import load_run_config

    config = load_run_config(None, args.config, args.overrides)
    print(f"# {args.config}: valid {config.recipe} config")
    print(config.to_yaml(), end="")


def run_eval(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from finetune.training.recipe import evaluate_run
    from finetune.training.registry import run_recipe as recipe_of

    recipe = recipe_of(Path(args.run_dir))
    metrics = evaluate_run(recipe, Path(args.run_dir), tuple(args.split), args.model)
    print(json.dumps(metrics) if args.json else recipe.summary_table(metrics))


def run_list(args: argparse.Namespace) -> None:
    from finetune.training.registry import presets, recipe_names

    found = presets()
    width = max((len(p.name) for p in found), default=0)
    for recipe in recipe_names():
        print(f"{recipe}:")
        for preset in (p for p in found if p.recipe == recipe):
            print(f"  {preset.name:<{width}}  {preset.purpose}")
    print("run one with: finetune run RECIPE --config PRESET [key=value ...]")


def run_runs(args: argparse.Namespace) -> None:
    import json

    from finetune.experiments.runs_table import as_csv, as_text, runs_table

    rows = runs_table(args.directory, args.sort, args.descending)
    print(
        json.dumps(rows, indent=2) if args.json else as_csv(rows) if args.csv else as_text(rows, args.sort),
        end="" if args.csv else "\n",
    )


def run_sweep_command(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from finetune.experiments.runs_table import as_text, runs_table
    from finetune.experiments.sweep import best_line, run_sweep, run_worker, sweep_from

    sweep = sweep_from(args)
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        run_worker(sweep, job["points"], job["worker"])
        return
    argv = [
        "sweep",
        *([sweep.recipe] if args.recipe else []),
        *args.params,
        *(["--spec", args.spec] if args.spec else []),
        *sum(
            (
                ["--" + k, str(v)]
                for k, v in (
                    ("config", args.config),
                    ("metric", args.metric),
                    ("direction", args.direction),
                    ("sampler", args.sampler),
                    ("trials", args.trials),
                    ("out", args.out),
                    ("storage", args.storage),
                )
                if v is not None
            ),
            [],
        ),
        *sum((["--set", o] for o in args.set), []),
    ]
    out = run_sweep(sweep, args.parallel, argv)
    print(as_text(runs_table(out, sweep.metric, sweep.direction == "max"), sweep.metric))
    print(best_line(sweep))
    print(f"the study: {sweep.storage}; the plot: {out / 'sweep.png'}")


def run_config_reference(args: argparse.Namespace) -> None:
    from finetune.training.config_reference import as_markdown, as_text, config_keys
    from finetune.training.registry import recipe

    rows = config_keys(recipe(args.recipe).Config)
    print(
        as_markdown(args.recipe, rows) if args.markdown else as_text(args.recipe, rows),
        end="" if args.markdown else "\n",
    )
