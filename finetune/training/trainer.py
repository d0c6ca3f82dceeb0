"""The one training loop every recipe uses, on Hugging Face accelerate.

A recipe hands over a model, datasets, a collate function and a `Task` (how to compute the loss and
evaluate); the trainer does the rest: device placement, mixed precision, multi-process, gradient
accumulation, AdamW, the LR schedule, evaluation, keep-best, early stopping, metrics files, and
resumable checkpoints. What the output directory holds, and its checks, are `finetune.checkpoints.run_directory`'.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from accelerate import Accelerator
from accelerate.utils import (
    broadcast_object_list,
    gather_object,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune.checkpoints import atomic
from finetune.checkpoints.model_files import load_weights, model_files
from finetune.checkpoints.run_directory import (
    BEST,
    CHECKPOINTS,
    METRICS,
    append_metrics,
    check_output_dir,
    checkpoint_dirs,
    keep_metrics_until,
    kept_checkpoint,
    latest_checkpoint,
    mark_state,
    read_metrics,
    start_run_dir,
)
from finetune.checkpoints.training_state import (
    load_training_state,
    rng_state,
    training_state_files,
)
from finetune.config import RunConfig
from finetune.errors import Interrupted, UserError
from finetune.model.gpt import GPT
from finetune.progress import progress
from finetune.training.accelerator import bf16_hint, environment
from finetune.training.optimizer import adamw
from finetune.training.trackers import log_row, start_trackers
from finetune.training.trainable import parameter_counts


class Examples(Protocol):
    """A map-style dataset: sized and indexed (a list will do)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class Task(Protocol):
    """What a recipe teaches the trainer."""

    unit: str  # what `count` counts ("tokens", "examples"): the progress bar shows it per second

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor | dict[str, torch.Tensor]:
        """Sum (not mean) of the per-target losses in `batch`; or a dict of it (`loss`) and other sums
        over the targets (rewards, say), which the trainer logs per target with each step's loss."""

    def count(self, batch: dict) -> float:
        """Number of targets in `batch` (examples, or unmasked tokens), from host data the collate
        counted: reading a device tensor here would stall the device every step."""

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Metrics over the whole loader, gathered across processes."""


@runtime_checkable
class RolloutTask(Task, Protocol):
    """A task whose training batches the model itself makes (reinforcement learning): each step's
    micro-batches of prompts go through `rollout` once (sampling, rewards), then `updates_per_batch`
    optimizer steps learn from what it returned. One trainer step is that whole round, so checkpoints
    fall between rounds and a resumed run samples again from the restored random state."""

    updates_per_batch: int

    def rollout(self, model: torch.nn.Module, micro: list[dict]) -> list[dict]:
        """The micro-batches to learn from, made with `model` (unwrapped, in eval mode, no gradients)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batches_in_epoch: int = 0  # micro-batches (per process) consumed in the current epoch
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    finished: bool = False
    nonfinite_skipped: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (on_nonfinite=skip)
    seen: int = 0  # targets trained on, all processes (tokens seen, for a language model)


@dataclass
class FitResult:
    kept: Path  # the checkpoint to evaluate: best/ or the last one
    state: TrainState
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        accelerator: Accelerator,
        model: torch.nn.Module,
        task: Task,
        train_set: Examples,
        val_set: Examples,
        collate: Callable[[list], dict],
        meta: dict[str, Any],
        quiet: bool = False,
        on_evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
        observe: Callable[[int, dict], None] | None = None,
    ) -> None:
        self.config = config
        self.train_cfg = config.train
        self.accelerator = accelerator
        self.task = task
        self.train_set = train_set
        self.collate = collate
        self.meta = meta  # extra config.json entries for every saved model (labels, max_length, …)
        self.quiet = quiet
        self.on_evaluate = on_evaluate  # after each evaluation (main process): fields for its metrics row
        self.observe = observe  # after each evaluation (main process): (step, metrics), e.g. a sweep's pruner
        self.out = Path(config.output_dir)
        self.state = TrainState()
        self.world = accelerator.num_processes
        self.received: list[int] = []  # signals this process received (set by fit)
        self.stop_signal: int | None = None  # a SIGINT/SIGTERM seen by any process, agreed at a step's end
        self.step_extras: dict[str, float] = {}  # the task's other sums of the last step, per target

        trainable, total = parameter_counts(model)
        if trainable == 0:
            raise UserError("no parameter is trainable; check finetune.trainable")
        if accelerator.is_main_process:  # shown even with --quiet: what every run should state
            tqdm.write(
                f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)", file=sys.stderr
            )
            where = environment(accelerator)
            tqdm.write(
                f"running on {where['device']}, {where['processes']} process(es), mixed precision "
                f"{where['mixed_precision']}",
                file=sys.stderr,
            )
            hint = bf16_hint(accelerator)
            if hint and not quiet:
                tqdm.write(hint, file=sys.stderr)
        for module in model.modules():  # the trunk, also inside a classifier
            if isinstance(module, GPT):
                module.activation_checkpointing = self.train_cfg.activation_checkpointing
        self.optimizer = adamw(model, self.train_cfg.lr, self.train_cfg.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        eval_bs = self.train_cfg.eval_batch_size or self.train_cfg.batch_size
        self.val_loader = accelerator.prepare(eval_loader(val_set, eval_bs, collate))

        self.batches_per_epoch = math.ceil(len(train_set) / (self.train_cfg.batch_size * self.world))  # per process
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.train_cfg.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * self.train_cfg.epochs

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        cfg = self.train_cfg
        self._prepare_output_dir()
        set_seed(cfg.seed + self.accelerator.process_index)
        if self.config.resume:
            self._resume()
        start_trackers(self.accelerator, self.config, self.state.step)
        bar = progress(
            None,
            "training",
            quiet=self.quiet or not self.accelerator.is_main_process,
            total=self.total_steps,
            initial=self.state.step,
        )
        with _signals_to_flag() as self.received:
            self._loop(bar)
        bar.close()
        self.state.finished = True
        self.save_checkpoint()
        if self.state.stopped_early:
            self._print(f"stopped early at step {self.state.step}: no improvement in {cfg.patience} evaluations")
        kept = Path(self._main_decides(lambda: str(kept_checkpoint(self.out))))
        # End holding the kept (best) weights, as they are evaluated next: no second model in memory.
        load_weights(self.accelerator.unwrap_model(self.model), kept)
        return FitResult(kept, self.state, read_metrics(self.out))

    def _loop(self, bar) -> None:
        cfg = self.train_cfg
        if cfg.eval_at_start and self.state.step == 0 and self.state.last_eval_step is None:
            self._evaluate(bar)
        started, seen_at_start = time.perf_counter(), self.state.seen
        while self.state.epoch < cfg.epochs and not self.state.stopped_early:
            batches = iter(self._train_loader(self.state.epoch, self.state.batches_in_epoch))
            while micro := list(islice(batches, cfg.grad_accum_steps)):
                lr = self._lr()
                loss, targets = self._round(micro, lr)
                self.state.step += 1
                self.state.seen += targets
                self.state.batches_in_epoch += len(micro)
                row = {"split": "train", "loss": loss, **self.step_extras, "lr": lr}
                if self.state.nonfinite_skipped:
                    row["nonfinite_skipped"] = self.state.nonfinite_skipped
                self._log(row)
                bar.update(1)
                rate = (self.state.seen - seen_at_start) / (time.perf_counter() - started)
                bar.set_postfix({"loss": f"{loss:.4f}", f"{self.task.unit}/s": f"{rate:,.0f}"}, refresh=False)
                if self.stop_signal:  # every process agreed on it in this step's all-reduce
                    self.save_checkpoint()
                    raise Interrupted(self.stop_signal, self.state.step, str(self.out / CHECKPOINTS))
                if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    self._evaluate(bar)
                    if self.state.stopped_early:
                        break
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if not self.state.stopped_early:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
            if self.state.last_eval_step != self.state.step:
                self._evaluate(bar)
            self.save_checkpoint()

    def _train_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        """This epoch's shuffled order (a function of seed and epoch), minus the batches already done."""
        generator = torch.Generator().manual_seed(self.train_cfg.seed + epoch)
        order = torch.randperm(len(self.train_set), generator=generator)
        start = skip_batches * self.train_cfg.batch_size * self.world
        loader: DataLoader = DataLoader(
            cast(Dataset, self.train_set),
            self.train_cfg.batch_size,
            sampler=order[start:].tolist(),
            collate_fn=self.collate,
            generator=generator,
        )  # own generator: keeps the global RNG for dropout
        return self.accelerator.prepare(loader)

    def _round(self, micro: list[dict], lr: float) -> tuple[float, int]:
        """One trainer step: an optimizer step over `micro`; for a `RolloutTask`, its rollouts first, then
        its updates on them, the logged loss and metrics averaged over the updates."""
        if not isinstance(self.task, RolloutTask):
            return self._optimizer_step(micro, lr)
        with torch.no_grad():
            micro = self.task.rollout(self.accelerator.unwrap_model(self.model), micro)
        losses, extras = [], []
        for _ in range(self.task.updates_per_batch):
            loss, targets = self._optimizer_step(micro, lr)
            losses.append(loss)
            extras.append(self.step_extras)
        self.step_extras = {name: sum(e[name] for e in extras) / len(extras) for name in extras[-1]}
        return sum(losses) / len(losses), targets

    def _optimizer_step(self, micro: list[dict], lr: float) -> tuple[float, int]:
        """One optimizer step over micro-batches; returns the loss per target and the targets (all processes).

        The summed loss is back-propagated as it is. Then one all-reduce of [targets, loss, SIGINT
        seen, SIGTERM seen, gradient norm²], the step's only wait for the device, gives every process
        the same numbers: the gradients are divided by the targets of all micro-batches on all
        processes (exact under accumulation and for batches of unequal size) and clipped in one pass,
        and a stop signal that reached any process stops them all after this step.
        """
        acc, cfg = self.accelerator, self.train_cfg
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        count = float(sum(self.task.count(b) for b in micro))
        loss_sum = torch.zeros((), device=acc.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            sync = acc.no_sync(self.model) if i < len(micro) - 1 else nullcontext()
            with sync:
                with acc.autocast():  # the task's own computation too (e.g. the chunked vocabulary loss)
                    out = self.task.loss(self.model, batch)
                loss, extras = (out, {}) if isinstance(out, torch.Tensor) else (out["loss"], out)
                acc.backward(loss * self.world)  # DDP averages gradients over processes: × world makes it a sum
            loss_sum += loss.detach().float()
            for name, value in extras.items():
                if name != "loss":
                    extra_sums[name] = extra_sums.get(name, 0) + value.detach().double()
        self.step_extras = {}
        fp16 = acc.mixed_precision == "fp16"
        if fp16:
            acc.unscale_gradients()  # the loss scaler's factor out before the norm is taken
        grads = [p.grad for p in self.params if p.grad is not None]
        host = torch.tensor(
            [count, signal.SIGINT in self.received, signal.SIGTERM in self.received],
            dtype=torch.float64,
            device=acc.device,
        )
        # DDP left the same gradients on every process: their norm² sums to world × norm².
        names = sorted(extra_sums)
        device_side = torch.stack(
            [loss_sum.double(), torch.nn.utils.get_total_norm(grads).double().square(), *(extra_sums[n] for n in names)]
        )
        total, sigint, sigterm, loss_total, norm_sq, *extra_totals = acc.reduce(
            torch.cat([host, device_side]), reduction="sum"
        ).tolist()
        self.step_extras = {n: v / total for n, v in zip(names, extra_totals, strict=True)}
        if sigint or sigterm:
            self.stop_signal = signal.SIGINT if sigint else signal.SIGTERM
        loss = loss_total / total
        grad_norm = math.sqrt(norm_sq / self.world) / total
        # Under fp16, infinite gradients are the loss scaler's business: it skips the step and lowers the scale.
        if not (math.isfinite(loss) and (math.isfinite(grad_norm) or fp16)):
            self.optimizer.zero_grad(set_to_none=True)  # the weights stay as they were
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            where = (
                f"step {self.state.step + 1} (epoch {self.state.epoch + 1}, batch {self.state.batches_in_epoch + 1})"
            )
            if cfg.on_nonfinite == "stop":
                raise UserError(
                    f"non-finite {what} at {where}; the last good checkpoint is kept in "
                    f"{self.out / CHECKPOINTS}; lower train.lr, set train.max_grad_norm, "
                    "or set train.on_nonfinite=skip"
                )
            self.state.nonfinite_skipped += 1
            self._print(f"skipped {where}: non-finite {what}")
            return loss, int(total)
        scale = 1 / total
        if cfg.max_grad_norm is not None and grad_norm > cfg.max_grad_norm:
            scale *= cfg.max_grad_norm / (grad_norm + 1e-6)  # clip, as torch.nn.utils.clip_grad_norm_ does
        torch._foreach_mul_(grads, scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, int(total)

    def _lr(self) -> float:
        """Learning rate for the step about to be taken: linear warmup, then constant or cosine."""
        cfg, step = self.train_cfg, self.state.step
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return cfg.lr
        progress = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # -- evaluation and keep-best -----------------------------------------------------------------

    def _evaluate(self, bar) -> None:
        cfg = self.train_cfg
        metrics = self.task.evaluate(self.model, self.val_loader, self.accelerator)
        if cfg.best_metric not in metrics:
            raise UserError(
                f"train.best_metric='{cfg.best_metric}' is not a validation metric; choose one of {sorted(metrics)}"
            )
        self.state.last_eval_step = self.state.step
        row = {"split": "val", **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if self.on_evaluate is not None and self.accelerator.is_main_process:
            row.update(self.on_evaluate(self.accelerator.unwrap_model(self.model)) or {})
        self._log(row)
        if self.observe is not None and self.accelerator.is_main_process:
            self.observe(self.state.step, metrics)
        bar.set_postfix({"val_" + cfg.best_metric: f"{metrics[cfg.best_metric]:.4f}"}, refresh=False)
        value = metrics[cfg.best_metric]
        best = self.state.best_value
        if best is None or (value < best if cfg.best_mode == "min" else value > best):
            self.state.best_value, self.state.best_step, self.state.evals_since_best = value, self.state.step, 0
            self._save(self.out / BEST, with_training_state=False)
        else:
            self.state.evals_since_best += 1
            if cfg.patience and self.state.evals_since_best >= cfg.patience:
                self.state.stopped_early = True

    # -- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        self._save(self.out / CHECKPOINTS / f"step-{self.state.step:07d}", with_training_state=True)
        if self.accelerator.is_main_process:
            for old in checkpoint_dirs(self.out)[: -self.train_cfg.keep_last]:
                shutil.rmtree(old)

    def _save(self, directory: Path, with_training_state: bool) -> None:
        self.accelerator.wait_for_everyone()
        # Every process's random state, so that each draws its own dropout masks again after a resume.
        rngs = gather_object([rng_state(self.accelerator.device)]) if with_training_state else []
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            files = model_files(model, self.meta)
            files["run_config.yaml"] = lambda path: path.write_text(self.config.to_yaml())
            if with_training_state:
                files.update(
                    training_state_files(self.optimizer, {**asdict(self.state), "processes": self.world}, rngs)
                )
            atomic.write_directory(directory, files)
        self.accelerator.wait_for_everyone()

    def _main_decides(self, decide: Callable[[], Any]) -> Any:
        """Run `decide` on the main process alone (it may rename and check files) and give every process
        its answer, or its error: a process left waiting for an answer would hang the run."""
        answer: list = [None, None]
        if self.accelerator.is_main_process:
            try:
                answer = [decide(), None]
            except UserError as e:
                answer = [None, str(e)]
        if self.world > 1:
            broadcast_object_list(answer)
        if answer[1] is not None:
            raise UserError(answer[1])
        return answer[0]

    def _resume(self) -> None:
        latest = self._main_decides(lambda: latest_checkpoint(self.out))
        if latest is None:
            self._print(f"resume=true: no checkpoint in {self.out / CHECKPOINTS}; starting from the beginning")
            if self.accelerator.is_main_process:
                (self.out / METRICS).unlink(missing_ok=True)
            return
        latest = Path(latest)
        document = load_training_state(
            latest, self.optimizer, self.accelerator.process_index, self.world, self.accelerator.device
        )
        load_weights(self.accelerator.unwrap_model(self.model), latest)
        self.state = TrainState(**{k: document[k] for k in asdict(TrainState()) if k in document})
        self._print(f"resuming from {latest} (step {self.state.step}, epoch {self.state.epoch + 1})")
        if self.accelerator.is_main_process:  # rows logged after that checkpoint belong to lost work
            keep_metrics_until(self.out, self.state.step)

    def _prepare_output_dir(self) -> None:
        """Refuse to overwrite another run unless asked to; never delete anything on resume."""
        check_output_dir(self.config)
        self.accelerator.wait_for_everyone()  # every process has checked before the main one writes
        if self.accelerator.is_main_process:
            start_run_dir(self.config)
            mark_state(self.out, "running")
        self.accelerator.wait_for_everyone()

    # -- output -----------------------------------------------------------------------------------

    def _log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {
            "step": self.state.step,
            "epoch": self.state.epoch + self.state.batches_in_epoch / self.batches_per_epoch,
            f"{self.task.unit}_seen": self.state.seen,
            **row,
        }
        append_metrics(self.out, row)
        log_row(self.accelerator, row, self.state.step)

    def _print(self, message: str) -> None:
        if self.accelerator.is_main_process and not self.quiet:
            tqdm.write(message, file=sys.stderr)


def eval_loader(dataset: Examples, batch_size: int, collate: Callable[[list], dict]) -> DataLoader:
    """Fixed order, and a generator of its own so that evaluating never moves the global RNG."""
    return DataLoader(
        cast(Dataset, dataset), batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator()
    )


@contextmanager
def _signals_to_flag() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag that the loop checks at the next step; a second signal acts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
