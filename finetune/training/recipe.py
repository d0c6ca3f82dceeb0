"""The recipe interface, and the story that runs it (in the spirit of torchtune's recipes).

A recipe is a training plugin: its data reader (`prepare`), its model and task (`build_model`,
`setup`), its evaluation (`evaluate`) and its report (`report`, `summary_table`). `train` runs them
as a story: config -> data (read and split once, before any model is built) -> model -> what trains
-> train -> evaluate the kept weights -> report. `evaluate_run` re-evaluates a finished run the same
way. What a trained model is (task, labels, prompt style) goes into `Setup.meta`, and so into every
checkpoint; using the model afterwards needs no recipe (`finetune.checkpoints.interface`).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from accelerate import Accelerator

from finetune.checkpoints.atomic import write_text_atomic
from finetune.checkpoints.interface import check_usable, interface_of
from finetune.checkpoints.model_files import read_meta, update_meta
from finetune.checkpoints.run_directory import (
    STATE_FILE,
    check_output_dir,
    kept_checkpoint,
    mark_state,
    run_state,
)
from finetune.config import RunConfig, load_config
from finetune.errors import Interrupted, UserError
from finetune.formats.loading import build_model, load_model, load_with_meta
from finetune.model.classifier import Model
from finetune.model.gpt import GPT
from finetune.training.accelerator import environment, make_accelerator
from finetune.training.next_token import perplexity_table
from finetune.training.report import run_report
from finetune.training.trackers import check_trackers, log_final
from finetune.training.trainable import configure_trainable, parameter_counts
from finetune.training.trainer import (
    Examples,
    Task,
    Trainer,
    eval_loader,
)

SPLITS = ("train", "val", "test")
C = TypeVar("C", bound=RunConfig)
D = TypeVar("D")  # what a recipe's data reader returns


@dataclass
class Setup:
    """What the trainer needs from a recipe."""

    train: Examples
    val: Examples
    collate: Callable[[list], dict]
    task: Task
    meta: dict[str, Any]  # stored in every checkpoint's config (labels, max_length, …)
    on_evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # fields logged with each evaluation
    reuse: dict[str, Any] = field(default_factory=dict)  # work `evaluate` may reuse at the end (cached features)


class Recipe(ABC, Generic[C, D]):
    name: str
    Config: type[C]
    merge_start: bool = False  # True: a start model's LoRA adapter is folded into the base, not trained on
    metric_names: tuple[str, ...] = ("loss", "perplexity")  # what `evaluate` reports per split (sweeps check it)
    headline_metric: str = "loss"  # of metric_names: the one `finetune runs`, the model card and the plots lead with

    @abstractmethod
    def prepare(self, config: C) -> D:
        """Read, check and split the data: cheap, so that bad data fails before a model is built."""

    def build_model(self, config: C, data: D) -> Model:
        """The model before `finetune.trainable` picks what trains: by default `model.name` as a
        language model."""
        return language_model(config)

    @abstractmethod
    def setup(self, config: C, data: D, model: Any, accelerator: Accelerator, quiet: bool) -> Setup:
        """Datasets, collate, task and checkpoint metadata for the trainer (`model`: what build_model made)."""

    @abstractmethod
    def evaluate(
        self,
        config: C,
        data: D,
        model: torch.nn.Module,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict[str, Any],
    ) -> dict:
        """Metrics of `model` (prepared, holding the kept weights) on `splits`."""

    def calibrate(self, config: C, data: D, model: Any, meta: dict, accelerator: Accelerator, reuse: dict) -> dict:
        """After training, on the kept weights: entries to add to the kept checkpoint's meta before it is
        evaluated (a multi-label model's thresholds tuned on validation). By default none."""
        return {}

    @abstractmethod
    def report(
        self, out: Path, config: C, data: D, metrics: dict, history: list[dict], model: torch.nn.Module, quiet: bool
    ) -> tuple[dict, list[str]]:
        """Main process only: add what the report needs to `metrics` and write its files (plots,
        responses); returns the metrics for metrics.json and the names of the files written."""

    def summary_table(self, metrics: dict) -> str:
        """The metrics a person reads first, as aligned text: by default loss and perplexity per split."""
        return perplexity_table(metrics)

    def report_body(self, config: C, metrics: dict, out: Path) -> list[str]:
        """The recipe's own section of report.md (Markdown lines), after what every run reports."""
        return []


def check_best_metric(recipe: Recipe, config: RunConfig) -> None:
    """`train.best_metric` is one the recipe reports, known before any data is read."""
    if recipe.headline_metric not in recipe.metric_names:
        raise UserError(
            f"recipe '{recipe.name}': headline_metric '{recipe.headline_metric}' is not one of its "
            f"metric_names ({', '.join(recipe.metric_names)})"
        )
    if config.train.best_metric not in recipe.metric_names:
        raise UserError(
            f"train.best_metric='{config.train.best_metric}' is not a metric the {recipe.name} recipe "
            f"reports; choose one of {', '.join(recipe.metric_names)}"
        )


def evaluate_splits(
    task: Task,
    model: torch.nn.Module,
    splits: Mapping[str, tuple[Examples, Callable[[list], dict]]],
    batch_size: int,
    accelerator: Accelerator,
) -> dict[str, dict]:
    """`task`'s metrics on each split (a dataset and its collate), every process evaluating its share."""
    return {
        name: task.evaluate(model, accelerator.prepare(eval_loader(data, batch_size, collate)), accelerator)
        for name, (data, collate) in splits.items()
    }


def language_model(config: RunConfig) -> GPT:
    """`model.name` for a recipe that trains a language model: anything but a classifier."""
    model = build_model(config.model.name, config.model.init, config.model.dropout)
    if not isinstance(model, GPT):
        raise UserError(
            f"model.name: '{config.model.name}' is a classifier; the {config.recipe} recipe trains a "
            "language model (give a language model, a hub id or a preset)"
        )
    return model


def base_spec(config: RunConfig, merged: bool = False) -> dict:
    """How to rebuild the base model under an adapter: its name, or (random init) the seed that made it;
    `merged`: the adapter the base came with is folded in (preference tuning starts from it so)."""
    return {
        "name": config.model.name,
        "init": config.model.init,
        "seed": config.train.seed,
        **({"merged": True} if merged else {}),
    }


def train(
    recipe: Recipe, config: RunConfig, quiet: bool = False, observe: Callable[[int, dict], None] | None = None
) -> dict:
    """Run `recipe` with `config` from data to report; returns the metrics written to metrics.json.
    `observe(step, metrics)` sees every validation (a sweep prunes with it)."""
    check_output_dir(config)
    check_trackers(config.train.report_to)
    check_best_metric(recipe, config)
    data = recipe.prepare(config)
    accelerator = make_accelerator(config.train)
    torch.manual_seed(config.train.seed)
    model = configure_trainable(recipe.build_model(config, data), config)
    setup = recipe.setup(config, data, model, accelerator, quiet)
    check_usable({**model.checkpoint_meta(), **setup.meta}, f"recipe '{recipe.name}'")
    trainer = Trainer(
        config,
        accelerator,
        model,
        setup.task,
        setup.train,
        setup.val,
        setup.collate,
        meta={**setup.meta, "base": base_spec(config, recipe.merge_start)},
        quiet=quiet,
        on_evaluate=setup.on_evaluate,
        observe=observe,
    )
    out = Path(config.output_dir)
    with recorded_state(out, accelerator.is_main_process):
        fit = trainer.fit()  # ends with the kept weights in trainer.model
        meta = read_meta(fit.kept)
        calibrated = recipe.calibrate(config, data, trainer.model, meta, accelerator, setup.reuse)
        if calibrated:
            meta |= calibrated
            if accelerator.is_main_process:
                update_meta(fit.kept, calibrated)
            accelerator.wait_for_everyone()
        metrics = recipe.evaluate(config, data, trainer.model, meta, SPLITS, accelerator, setup.reuse)
        metrics["environment"] = environment(accelerator)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(trainer.model)
            metrics, written = recipe.report(out, config, data, metrics, fit.history, model, quiet)
            metrics["headline_metric"] = recipe.headline_metric
            write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
            state = run_state(out)
            seconds = state["seconds"] + time.time() - state.get("segment_start", time.time())
            plots = [name for name in written if name.endswith(".png")]
            write_text_atomic(
                out / "report.md",
                run_report(
                    recipe.name,
                    config,
                    recipe.summary_table(metrics),
                    split_sizes(data, setup),
                    parameter_counts(model),
                    metrics["environment"],
                    seconds,
                    plots,
                    recipe.report_body(config, metrics, out),
                ),
            )
            written = [*written, "report.md"]
            log_final(accelerator, metrics, out, [name for name in written if name.endswith(".png")], fit.state.step)
            if not quiet:
                print(recipe.summary_table(metrics))
                print(f"results in {out}/: {', '.join(['metrics.json', *written])}")
    return metrics


def split_sizes(data: Any, setup: Setup) -> dict[str, int]:
    """Examples in each split, as report.md lists them: the recipe's own splits when its data holds them (a
    mapping of split to examples, or one under `.splits`), test included; else what the trainer got."""
    splits = getattr(data, "splits", data)
    if isinstance(splits, Mapping) and all(hasattr(examples, "__len__") for examples in splits.values()):
        return {split: len(splits[split]) for split in SPLITS if split in splits}
    return {"train": len(setup.train), "val": len(setup.val)}


@contextmanager
def recorded_state(out: Path, main: bool):
    """The run's state in its directory (`finetune runs` reads it): finished, interrupted or failed."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        if main and (out / STATE_FILE).is_file():
            mark_state(out, "interrupted")
        raise
    except BaseException as e:
        if main and (out / STATE_FILE).is_file():
            mark_state(out, "failed", f"{type(e).__name__}: {' '.join(str(e).split())}")
        raise
    if main:
        mark_state(out, "finished")


def evaluate_run(recipe: Recipe, out: Path, splits: tuple[str, ...], other: str | None = None) -> dict:
    """Metrics of a finished run's kept checkpoint: the same numbers as at the end of its training. With
    `other` (a PEFT adapter, an export, another run's checkpoint), that model's metrics on the same data."""
    config = load_config(recipe.Config, Path(out) / "config.yaml")
    accelerator = make_accelerator(config.train)
    if other is None:
        model, meta = load_model(kept_checkpoint(out))
    else:
        meta = read_meta(kept_checkpoint(out))
        model, own = load_with_meta(other)
        if (own["task"], own.get("num_classes"), interface_of(own).problem_type) != (
            meta["task"],
            meta.get("num_classes"),
            interface_of(meta).problem_type,
        ):
            kind = (
                f"{own.get('num_classes')}-output {interface_of(own).problem_type} classifier"
                if own["task"] == "classification"
                else "language model"
            )
            raise UserError(f"--model {other}: a {kind}, which the {recipe.name} run {out} cannot evaluate")
        meta |= {key: own[key] for key in ("model", "pool", "thresholds", "target_mean", "target_std") if key in own}
    return recipe.evaluate(config, recipe.prepare(config), accelerator.prepare(model), meta, splits, accelerator, {})
