"""`finetune sweep`: a search over config values of any recipe, on Optuna (the `sweep` extra).

Every trial is an ordinary run directory under the sweep's (`trial-000`, ...), so `finetune runs`,
`eval`, `serve` and `export` take it. The study lives in an Optuna storage (a SQLite file in the sweep
directory by default, or any database URL Optuna takes, which several machines can share). A grid is
every combination of the listed values, run in a fixed order; `random` and `tpe` draw `--trials`
points from lists and ranges (`uniform(a,b)`, `loguniform(a,b)`, `int(a,b)`). Trials are pruned when
their validation metric falls behind (Optuna's median pruner) where the metric is a validation one.
An interrupted sweep, run again, goes on: finished trials are kept, unfinished ones are run again.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import UserError
from finetune.training.registry import load_run_config, recipe, sweep_path

STUDY = "sweep"
RANGE = re.compile(r"^(uniform|loguniform|int)\(\s*([^,]+)\s*,\s*([^,]+)\s*\)$")


@dataclass(frozen=True)
class Param:
    key: str
    values: list | None = None  # a list to choose from
    kind: str | None = None  # or a range: uniform, loguniform, int
    low: float | None = None
    high: float | None = None

    def suggest(self, trial):
        if self.values is not None:
            return trial.suggest_categorical(self.key, self.values)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")


def parse_param(text: str) -> Param:
    """`key=[a,b]` (YAML list) or `key=uniform(a,b)`, `key=loguniform(a,b)`, `key=int(a,b)`."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(
            f"{text!r}: a swept setting is key=[values] or key=uniform(low,high); see finetune sweep --help"
        )
    found = RANGE.match(value.strip())
    if found:
        kind = found.group(1)
        try:
            low, high = (int(v) if kind == "int" else float(v) for v in found.group(2, 3))
        except ValueError:
            raise UserError(f"{key}: {value.strip()} needs two numbers") from None
        if low >= high or (kind == "loguniform" and low <= 0):
            raise UserError(
                f"{key}: {kind}({low}, {high}) is an empty range; give low < high (and low > 0 for loguniform)"
            )
        return Param(key, kind=kind, low=low, high=high)
    try:
        values = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise UserError(f"{key}: {value!r} is neither a YAML list nor a range ({e.problem})") from None
    if not isinstance(values, list):
        raise UserError(f"{key}: {value!r} is neither a list [a, b, ...] nor a range uniform(low, high)")
    if not values:
        raise UserError(f"{key}: an empty list; give at least one value")
    return Param(key, values=values)


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


@dataclass
class Sweep:
    recipe: str
    config: str | None
    overrides: list[str]
    params: list[Param]
    metric: str
    direction: str
    sampler: str
    trials: int | None
    storage: str
    out: Path

    def grid(self) -> list[dict]:
        return [
            dict(zip([p.key for p in self.params], combo, strict=True))
            for combo in itertools.product(*(p.values or [] for p in self.params))
        ]

    def trial_config(self, values: dict, out: Path):
        return load_run_config(
            self.recipe,
            self.config,
            [*self.overrides, *(_override(k, v) for k, v in values.items()), f"output_dir={out}"],
        )


def sweep_from(args) -> Sweep:
    """The sweep the command line describes, on top of a --spec file's."""
    spec: dict = {}
    if args.spec:
        path = sweep_path(args.spec, args.recipe)
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    name = args.recipe or spec.get("recipe")
    if not name:
        raise UserError("name a recipe (finetune sweep RECIPE key=[values] ...) or give --spec")
    params = [
        parse_param(f"{k}={json.dumps(v) if isinstance(v, list) else v}")
        for k, v in (spec.get("parameters") or {}).items()
    ]
    params += [parse_param(p) for p in args.params]
    if not params:
        raise UserError("nothing to sweep: give key=[a,b] or key=uniform(low,high)")
    metric = args.metric or spec.get("metric")
    if not metric:
        raise UserError("--metric: which metric to optimise, e.g. val.accuracy or val.loss")
    sampler = args.sampler or spec.get("sampler") or ("grid" if all(p.values is not None for p in params) else "tpe")
    out = Path(args.out or spec.get("out") or f"runs/sweep-{name}")
    return Sweep(
        name,
        args.config or spec.get("config"),
        [*(spec.get("overrides") or []), *args.set],
        params,
        metric,
        args.direction or spec.get("direction") or ("min" if metric.endswith("loss") else "max"),
        sampler,
        args.trials or spec.get("trials"),
        args.storage or f"sqlite:///{(out / 'study.db').resolve()}",
        out,
    )


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError('finetune sweep needs Optuna: pip install "finetune-gpt2[sweep]"') from None


def check(sweep: Sweep) -> None:
    """Everything that can be known before the first trial: Optuna itself, the recipe, every trial's config
    (each grid point, each range's ends), the metric, the sampler and the storage."""
    require_optuna()
    found = recipe(sweep.recipe)
    if sweep.sampler == "grid" and any(p.values is None for p in sweep.params):
        raise UserError("--sampler grid takes lists only; use --sampler random or tpe for ranges")
    if sweep.sampler != "grid" and not sweep.trials:
        raise UserError(f"--sampler {sweep.sampler} needs --trials N")
    points = (
        sweep.grid()
        if sweep.sampler == "grid"
        else [{p.key: (p.values[0] if p.values is not None else p.low)} for p in sweep.params]
        + [{p.key: (p.values[-1] if p.values is not None else p.high)} for p in sweep.params]
    )
    for values in points:
        try:
            sweep.trial_config(values, sweep.out / "check")
        except UserError as e:
            raise UserError(f"trial {values}: {e}") from None
    split, _, name = sweep.metric.partition(".")
    if split not in ("val", "test") or name not in found.metric_names:
        raise UserError(
            f"--metric {sweep.metric}: the {sweep.recipe} recipe reports val.NAME and test.NAME with NAME "
            f"one of {', '.join(found.metric_names)}"
        )
    import optuna

    try:
        optuna.storages.get_storage(sweep.storage)
    except Exception as e:  # Optuna raises many types for a URL it cannot open
        raise UserError(
            f"--storage {sweep.storage}: Optuna cannot open it ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None


def open_study(sweep: Sweep, worker: int = 0):
    """The study in its storage; each worker process samples with a seed of its own."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {
        "grid": optuna.samplers.RandomSampler(seed=worker),
        "random": optuna.samplers.RandomSampler(seed=worker),
        "tpe": optuna.samplers.TPESampler(seed=worker),
    }
    return optuna.create_study(
        study_name=STUDY,
        storage=sweep.storage,
        direction="maximize" if sweep.direction == "max" else "minimize",
        sampler=samplers[sweep.sampler],
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        load_if_exists=True,
    )


def fail_abandoned(study) -> None:
    """Trials left RUNNING by a process that is gone (a kill, a crash) are failed, to be run again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        alive = pid is not None and trial.user_attrs.get("host") == os.uname().nodename
        try:
            if alive:
                os.kill(pid, 0)  # signal 0: does the process exist?
        except OSError:
            alive = False
        if not alive:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


def pending_grid(sweep: Sweep, study) -> list[dict]:
    """Grid points with no finished (complete or pruned) trial yet, in grid order."""
    from optuna.trial import TrialState

    done = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
    return [values for values in sweep.grid() if values not in done]


def objective(sweep: Sweep):
    def run(trial) -> float:
        import optuna

        from finetune.checkpoints.run_directory import mark_state
        from finetune.training.recipe import train

        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", os.uname().nodename)
        values = {p.key: p.suggest(trial) for p in sweep.params}  # an enqueued grid point's values, or sampled
        out = sweep.out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", str(out))
        config = sweep.trial_config(values, out)
        split, _, name = sweep.metric.partition(".")

        def observe(step: int, metrics: dict) -> None:
            if split == "val" and isinstance(metrics.get(name), (int, float)):
                trial.report(metrics[name], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{sweep.metric} {metrics[name]:.4g} at step {step}")

        try:
            metrics = train(recipe(sweep.recipe), config, quiet=True, observe=observe)
        except optuna.TrialPruned:
            mark_state(out, "pruned")
            raise
        return float(metrics[split][name])

    return run


def run_worker(sweep: Sweep, points: list[dict] | None, worker: int = 0) -> None:
    """Trials in this process: the given grid points, or sampled ones until the study holds --trials."""
    import optuna
    from optuna.trial import TrialState

    study = open_study(sweep, worker)
    if points is not None:
        for values in points:
            study.enqueue_trial(values)
            trial = study.ask()
            try:
                value = objective(sweep)(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
        return
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    assert sweep.trials is not None, "a sampler other than grid has its trial count (checked before any trial)"
    study.optimize(objective(sweep), callbacks=[optuna.study.MaxTrialsCallback(sweep.trials, states=finished)])


def run_sweep(sweep: Sweep, parallel: int, argv: list[str]) -> Path:
    """Check, resume or start the study, run the trials (in `parallel` processes), write the table and plot."""
    require_optuna()
    sweep.out.mkdir(parents=True, exist_ok=True)  # where the default storage goes
    check(sweep)
    study = open_study(sweep)
    fail_abandoned(study)
    points = pending_grid(sweep, study) if sweep.sampler == "grid" else None
    if parallel <= 1:
        run_worker(sweep, points)
    else:
        workers = []
        for k in range(parallel):
            share = None if points is None else points[k::parallel]
            if share == []:
                continue
            (sweep.out / f".worker-{k}.json").write_text(json.dumps({"worker": k + 1, "points": share}))
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "finetune", *argv, "--worker", str(sweep.out / f".worker-{k}.json")]
                )
            )
        codes = [w.wait() for w in workers]
        if any(codes):
            raise UserError(
                f"{sum(1 for c in codes if c)} of {len(codes)} sweep workers failed; run the same command to go on"
            )
    write_results(sweep, open_study(sweep))
    return sweep.out


def write_results(sweep: Sweep, study) -> None:
    """sweep.png: the metric against each swept value, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    fig, axes = plt.subplots(1, len(sweep.params), figsize=(5 * len(sweep.params), 4), squeeze=False)
    for ax, param in zip(axes[0], sweep.params, strict=False):
        xs = [t.params.get(param.key) for t in done]
        labels = [str(x) for x in xs] if param.values is not None else xs
        ax.scatter(labels, [t.value for t in done])
        if param.kind == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=param.key, ylabel=sweep.metric, title=f"{sweep.metric} by {param.key}")
    fig.suptitle(
        f"{sweep.recipe} sweep: {len(done)} trials, best {sweep.metric} {study.best_value:.4g}"
        if done
        else f"{sweep.recipe} sweep: no finished trial"
    )
    fig.tight_layout()
    fig.savefig(sweep.out / "sweep.png", dpi=110)
    plt.close(fig)


def best_line(sweep: Sweep) -> str:
    study = open_study(sweep)
    try:
        best = study.best_trial
    except ValueError:
        return "no trial finished"
    return f"best {sweep.metric} = {best.value:.4g} in {best.user_attrs.get('run')} with {json.dumps(best.params)}"
