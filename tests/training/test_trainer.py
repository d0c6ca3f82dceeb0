"""The trainer on its own, through a toy task (least squares on a linear model): the same updates as a
hand-written AdamW loop, keep-best and early stopping, and resume after a crash; and through a tiny
language model: one host synchronisation per step, mixed precision as accelerate was launched."""

import json
import math

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType

from finetune import GPT, GPTConfig
from finetune.config import RunConfig, load_config
from finetune.errors import UserError
from finetune.model.losses import IGNORE, next_token_loss
from finetune.checkpoints.run_directory import checkpoint_dirs, write_metrics_csv
from finetune.checkpoints.model_files import load_weights
from finetune.training.accelerator import make_accelerator
from finetune.training.trainer import Trainer


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def checkpoint_meta(self) -> dict:
        return {"task": "toy"}


class LeastSquares:
    """Sum of squared errors; validation metrics scripted by `scores` when given."""

    unit = "examples"

    def __init__(self, scores: list[float] | None = None) -> None:
        self.scores, self.evaluations = scores, 0

    def loss(self, model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).sum()

    def count(self, batch):
        return len(batch["y"])

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator):
        errors = torch.cat([(model(b["x"]) - b["y"]) ** 2 for b in loader])
        self.evaluations += 1
        score = self.scores[self.evaluations - 1] if self.scores else 0.0
        return {"loss": errors.mean().item(), "score": score}


def data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(n, generator=g)
    return list(zip(x, y))


def collate(rows):
    return {"x": torch.stack([x for x, _ in rows]), "y": torch.stack([y for _, y in rows])}


def config(tmp_path, *overrides: str) -> RunConfig:
    return load_config(RunConfig, None, ["recipe=toy", f"output_dir={tmp_path / 'run'}", "train.epochs=3",
                                         "train.batch_size=4", "train.lr=0.05", "train.weight_decay=0.1", *overrides])


def fit(cfg: RunConfig, task=None) -> tuple[Toy, Trainer]:
    torch.manual_seed(0)
    model = Toy()
    trainer = Trainer(cfg, make_accelerator(cfg.train), model, task or LeastSquares(), data(22, 1), data(8, 2), collate,
                      meta={}, quiet=True)
    trainer.fit()
    return trainer.accelerator.unwrap_model(trainer.model), trainer


def test_updates_equal_a_hand_written_adamw_loop(tmp_path):
    """22 examples in batches of 4, accumulated 2 at a time: steps of 8, 8 and 6 examples per epoch;
    linear warmup then cosine. The trainer divides each step's summed loss by its examples."""
    cfg = config(tmp_path, "train.grad_accum_steps=2", "train.schedule=cosine", "train.warmup_steps=2",
                 "train.min_lr_ratio=0.2")
    trained, trainer = fit(cfg)
    assert trainer.state.step == 9 and trainer.total_steps == 9

    torch.manual_seed(0)
    model, train = Toy(), data(22, 1)
    optimizer = torch.optim.AdamW([{"params": [model.linear.weight], "weight_decay": 0.1},
                                   {"params": [model.linear.bias], "weight_decay": 0.0}], lr=0.05)
    step = 0
    for epoch in range(3):
        order = torch.randperm(22, generator=torch.Generator().manual_seed(123 + epoch)).tolist()
        for first in range(0, 22, 8):
            rows = [train[i] for i in order[first:first + 8]]
            if step < 2:
                lr = 0.05 * (step + 1) / 2
            else:
                floor = 0.05 * 0.2
                lr = floor + (0.05 - floor) * 0.5 * (1 + math.cos(math.pi * (step - 2) / 7))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = collate(rows)
            (((model(batch["x"]) - batch["y"]) ** 2).sum() / len(rows)).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    # fit() ends holding the kept (best) weights; the final ones are in the last resumable checkpoint.
    final = Toy()
    load_weights(final, checkpoint_dirs(tmp_path / "run")[-1])
    for name, p in final.state_dict().items():
        assert torch.allclose(p, model.state_dict()[name], atol=1e-6), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 10))
    assert train_rows[0]["lr"] == pytest.approx(0.025)
    assert train_rows[-1]["lr"] == pytest.approx(0.01 + 0.04 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))


def test_keeps_the_best_evaluation_and_stops_early(tmp_path):
    """Evaluations every 2 steps score 0.5, 0.9, 0.7, 0.6: the step-4 model is kept, and with patience 2
    training stops after the second evaluation without improvement."""
    cfg = config(tmp_path, "train.eval_every=2", "train.best_metric=score", "train.best_mode=max", "train.patience=2")
    task = LeastSquares(scores=[0.5, 0.9, 0.7, 0.6, 0.1, 0.1])
    kept, trainer = fit(cfg, task)
    assert trainer.state.best_step == 4 and trainer.state.best_value == 0.9
    assert trainer.state.stopped_early and trainer.state.step == 8 and task.evaluations == 4
    at_step_4 = Toy()
    load_weights(at_step_4, tmp_path / "run" / "best")
    assert all(torch.equal(a, b) for a, b in zip(at_step_4.state_dict().values(), kept.state_dict().values()))
    write_metrics_csv(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 1 + 8 + 4


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, monkeypatch):
    uninterrupted, _ = fit(config(tmp_path / "a", "train.checkpoint_every=2"))

    original, calls = Trainer._optimizer_step, [0]

    def crash_at_step_5(self, micro, lr):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt  # like a kill: no checkpoint is written for this step
        return original(self, micro, lr)

    monkeypatch.setattr(Trainer, "_optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        fit(config(tmp_path / "b", "train.checkpoint_every=2"))
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    resumed, trainer = fit(config(tmp_path / "b", "train.checkpoint_every=2", "resume=true"))
    assert trainer.state.finished
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows = (tmp_path / "a" / "run" / "metrics.jsonl").read_text(), (tmp_path / "b" / "run" / "metrics.jsonl").read_text()
    assert rows[0] == rows[1]


class NextToken:
    """Next-token loss on rows of token ids, as the language-model recipes compute it."""

    unit = "tokens"

    def loss(self, model, batch):
        return next_token_loss(model, batch["ids"], batch["targets"])

    def count(self, batch):
        return batch["count"]

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator):
        return {"loss": 0.0}


def token_rows(n: int, seed: int) -> list[torch.Tensor]:
    return list(torch.randint(0, VOCAB, (n, 24), generator=torch.Generator().manual_seed(seed)))


def collate_tokens(rows):
    ids = torch.stack(rows)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = IGNORE
    return {"ids": ids, "targets": targets, "count": targets.shape[0] * (targets.shape[1] - 1)}


VOCAB = 300


def lm_trainer(tmp_path, *overrides: str) -> Trainer:
    cfg = config(tmp_path, "train.epochs=1", "train.lr=0.001", *overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_embd=32, n_layer=2, n_head=2))
    return Trainer(cfg, make_accelerator(cfg.train), model, NextToken(), token_rows(16, 1), token_rows(4, 2),
                   collate_tokens, meta={}, quiet=True)


def test_one_wait_for_the_device_per_optimizer_step(tmp_path, monkeypatch):
    """Reading a device tensor on the host (`.item()`, `.tolist()`, `float(t)`, …) waits for the device
    to finish all its queued work. A step reads one: the all-reduced [targets, loss, signals, norm²]."""
    trainer = lm_trainer(tmp_path, "train.batch_size=2", "train.grad_accum_steps=2", "train.max_grad_norm=1.0")
    reads, inside = [], [False]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step, steps = Trainer._optimizer_step, []

    def observed(self, micro, lr):
        inside[0], before = True, len(reads)
        try:
            return step(self, micro, lr)
        finally:
            inside[0] = False
            steps.append(reads[before:])

    monkeypatch.setattr(Trainer, "_optimizer_step", observed)
    trainer.fit()
    assert len(steps) == 4 and all(s == ["tolist"] for s in steps), steps


def test_vocabulary_products_follow_mixed_precision(tmp_path):
    """Under bf16 the trainer's autocast reaches the chunked loss, which runs outside the model's
    forward: logits, and the gradients of hidden states and of the (tied) head, are bf16 products."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class VocabularyProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                operands = [a for a in args if isinstance(a, torch.Tensor)][-2:]
                if any(VOCAB in a.shape for a in operands):
                    self.dtypes.append(tuple(a.dtype for a in operands))
            return func(*args, **(kwargs or {}))

    trainer = lm_trainer(tmp_path, "train.batch_size=8", "train.mixed_precision=bf16")
    assert trainer.accelerator.mixed_precision == "bf16"
    with VocabularyProducts() as products:
        trainer._optimizer_step([next(iter(trainer._train_loader(0, 0)))], 0.001)
    assert len(products.dtypes) == 3  # logits, d hidden, d weight: one chunk of 8 x 23 rows
    assert set(products.dtypes) == {(torch.bfloat16, torch.bfloat16)}, products.dtypes


def test_precision_is_the_one_accelerate_was_launched_with(tmp_path, monkeypatch, capsys):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; an unset
    train.mixed_precision follows it, a conflicting one is refused in one line."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator(config(tmp_path).train).mixed_precision == "bf16"
    assert make_accelerator(config(tmp_path, "train.mixed_precision=bf16").train).mixed_precision == "bf16"
    with pytest.raises(UserError, match=r"^train.mixed_precision=no but accelerate was launched with mixed precision 'bf16'"):
        make_accelerator(config(tmp_path, "train.mixed_precision=no").train)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert make_accelerator(config(tmp_path).train).mixed_precision == "no"  # no launcher: fp32


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_training_is_refused_at_start(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: kind))
    with pytest.raises(UserError, match=f"^{kind.value} is not supported; launch on one device or with DDP"):
        make_accelerator(config(tmp_path).train)


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_matmuls_on_cuda_as_configured_and_cpu_left_alone(tmp_path, monkeypatch, tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        make_accelerator(config(tmp_path, f"train.tf32={str(tf32).lower()}").train)  # on CPU: untouched
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not tf32, not tf32)
        monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("cuda")))
        make_accelerator(config(tmp_path, f"train.tf32={str(tf32).lower()}").train)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("has_bf16, precision, quiet, shown", [
    (True, "no", False, True), (True, "bf16", False, False), (False, "no", False, False), (True, "no", True, False),
])
def test_an_fp32_run_on_a_cpu_with_bf16_says_bf16_would_be_faster(tmp_path, capsys, monkeypatch, has_bf16, precision,
                                                                  quiet, shown):
    from tests.helpers import cli, small_spam_file, tiny_spam_args
    import finetune.training.accelerator as accelerator

    monkeypatch.setattr(accelerator, "cpu_has_bf16", lambda: has_bf16)
    args = tiny_spam_args(small_spam_file(tmp_path / "sms.tsv", 8), tmp_path / "run", "train.epochs=1",
                          f"train.mixed_precision={precision}")
    code, _, err = cli(capsys, *[a for a in args if quiet or a != "--quiet"])
    assert code == 0, err
    assert ("train.mixed_precision=bf16 would train faster" in err) == shown, err
