"""The spam recipe end to end on small real data, and the trainer behaviours it relies on."""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from finetune.datasets import SMS_SPAM, bundled
from finetune.recipes.spam import RECIPE, SpamConfig
from safetensors.torch import load_file

from finetune.training.registry import load_run_config
from finetune.data.tables import read_table
from finetune.training.trainer import Trainer
from finetune.formats.loading import load_model
from tests.helpers import (
    classifier_for,
    cli,
    one_line_error,
    small_spam_file,
    ticket_run_args,
    tiny_spam_args,
)


@pytest.fixture
def data(tmp_path):
    return small_spam_file(tmp_path / "sms.tsv")


def weights(directory):
    adapter = directory / "adapter.safetensors"
    return load_file(adapter if adapter.exists() else directory / "model.safetensors")


def test_bundled_data_has_every_row():
    frame = read_table(bundled(SMS_SPAM), "raw").frame
    assert len(frame) == 5574
    assert (frame["label"] == "spam").sum() == 747  # 4,827 ham + 747 spam


def test_balanced_stratified_split():
    data = RECIPE.prepare(SpamConfig())
    assert data.labels == ["ham", "spam"]
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sum(sizes.values()) == 2 * 747
    assert sizes == {"train": 1045, "val": 150, "test": 299}
    for split in data.splits.values():  # stratified: half spam in every split
        assert abs(sum(label for label, _ in split) / len(split) - 0.5) < 0.01
    assert RECIPE.prepare(SpamConfig()).splits == data.splits
    # The same messages in the same order as the spam recipe made before it became a classification preset.
    digests = {name: hashlib.sha256(repr(split).encode()).hexdigest()[:16] for name, split in data.splits.items()}
    assert digests == {"train": "b0167068027c8397", "val": "4f4b322ef90341e8", "test": "97367d7c46c3754d"}


def test_spam_tiny_split_is_the_one_the_spam_recipe_always_made():
    """Digests of spam_tiny's (unbalanced) split, computed with the spam recipe before it became a preset
    of the classification recipe: the same messages, labels and order in every split. The bundled file's
    duplicates are named as the bundled data, not by a path inside site-packages."""
    with pytest.warns(UserWarning, match=r"^the bundled SMS Spam Collection: \d+ duplicate text\(s\) kept") as caught:
        data = RECIPE.prepare(load_run_config("spam", "spam_tiny", []))
    assert not any(str(bundled(SMS_SPAM).parent) in str(w.message) for w in caught)
    digests = {name: hashlib.sha256(repr(split).encode()).hexdigest()[:16] for name, split in data.splits.items()}
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 3901, "val": 558, "test": 1115}
    assert digests == {"train": "6e2c483564d3c8d0", "val": "1723ca8171f66d70", "test": "03e71aae81e31c97"}


def test_run_writes_metrics_plots_and_eval_reproduces_them(tmp_path, data, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_spam_args(data, out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test", "baseline", "environment", "headline_metric"}
    assert metrics["headline_metric"] == "accuracy"  # the recipe's, which `finetune runs` and the model card lead with
    assert metrics["environment"] == {"mixed_precision": "no", "device": "cpu", "processes": 1}
    assert "running on cpu, 1 process(es), mixed precision no" in err
    for key in ("accuracy", "loss", "f1", "precision", "recall", "confusion_matrix"):
        assert key in metrics["test"]
    assert set(metrics["baseline"]) == {"train", "val", "test"}
    assert metrics["test"]["n"] == 16 and sum(map(sum, metrics["test"]["confusion_matrix"])) == 16
    for name in ("curves.png", "confusion_matrix.png", "metrics.csv", "metrics.jsonl", "config.yaml", "best/config.json"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()  # one page: what ran, on what, how long, how well, the plots
    for part in ("| trains | all: ", "| data | 56 train, 8 val, 16 test |", "| ran on | cpu, 1 process(es)", "| wall time | ",
                 "GPT-2 test", "![confusion_matrix](confusion_matrix.png)"):
        assert part in report, part
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 15))  # 56 train / 8 = 7 x 2 epochs

    code, printed, _ = cli(capsys, "eval", str(out), "--split", "test", "--json")
    assert code == 0 and json.loads(printed)["test"] == metrics["test"]

    code, printed, _ = cli(capsys, "classify", str(out), "--text", "Free entry! Win a prize now", "--text", "see you soon")
    assert code == 0 and len(printed.splitlines()) == 2
    assert all(line.split("\t")[0] in ("ham", "spam") for line in printed.splitlines())

    assert "resume=true" in one_line_error(capsys, *tiny_spam_args(data, out))  # never overwrite a run silently


DROPOUT = "model.dropout=0.1"  # dropout: the RNG state matters on resume
RESUMED = {
    "full": (2, (DROPOUT,)),
    "lora": (2, (DROPOUT, "finetune.trainable=lora", "lora.rank=4", "lora.train_modules=[head]", "lora.dropout=0.1")),
    "last_block_feature_cache": (2, ("finetune.trainable=last_block",)),  # the book's setup: dropout 0, cached trunk
    "5_classes": (5, (DROPOUT,)),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, data, capsys, monkeypatch, case):
    classes, method = RESUMED[case]
    if classes == 2:
        run_args = lambda out, *extra: tiny_spam_args(data, out, *extra)  # noqa: E731
    else:  # 80 tickets: 56 train, 7 steps an epoch as for the spam data
        run_args = ticket_run_args(tmp_path)
    extra = ("train.checkpoint_every=3", "train.keep_last=2", *method)
    code, _, err = cli(capsys, *run_args(tmp_path / "full", *extra))
    assert code == 0, err
    assert ("feature cache" in err) == (case == "last_block_feature_cache"), err

    saves = 0
    original = Trainer.save_checkpoint

    def save_then_die(self):
        nonlocal saves
        original(self)
        saves += 1
        if saves == 2:  # mid-epoch: step 6 of 7 in the first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    code, _, _ = cli(capsys, *run_args(tmp_path / "cut", *extra))
    assert code == 130
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    code, _, err = cli(capsys, *run_args(tmp_path / "cut", *extra, "resume=true"))
    assert code == 0, err

    for kept in ("best", "checkpoints/step-0000014"):
        full, cut = weights(tmp_path / "full" / kept), weights(tmp_path / "cut" / kept)
        assert (case == "lora") == ("gpt.blocks.0.attn.qkv.lora_A" in full)
        assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full), kept
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text()) == full_metrics
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


def test_last_block_trains_only_last_block_final_norm_and_head(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = tiny_spam_args(data, out, "finetune.trainable=last_block", "train.epochs=1", "train.checkpoint_every=1",
                          "train.keep_last=100")
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    trainable = ("gpt.blocks.1.", "gpt.ln_f.", "head.")
    # Checkpoints hold the trained tensors only; the frozen rest is rebuilt from the base (here: its seed).
    stored = weights(out / "checkpoints" / "step-0000007")
    assert stored and all(name.startswith(trainable) for name in stored)
    first, last = (load_model(out / "checkpoints" / step)[0].state_dict() for step in ("step-0000001", "step-0000007"))
    torch.manual_seed(123)
    initial = classifier_for(SpamConfig(model={"name": "gpt2-tiny", "init": "random"})).state_dict()
    assert initial.keys() == last.keys()
    for name in initial:
        if name.startswith(trainable):
            assert not torch.equal(initial[name], last[name]), f"{name} did not train"
            assert torch.equal(stored[name], last[name])
        else:
            assert torch.equal(initial[name], first[name]) and torch.equal(initial[name], last[name]), f"{name} changed"

    code, _, err = cli(capsys, "merge", str(out), str(tmp_path / "merged"))  # a stand-alone copy
    assert code == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    best = load_model(out / "best")[0].state_dict()
    assert all(torch.equal(merged[name], best[name]) for name in merged) and len(merged) == len(best) - 1  # lm_head is tied


@pytest.mark.parametrize("classes", [2, 5])
def test_feature_cache_gives_the_same_run(tmp_path, data, capsys, classes):
    """Frozen layers computed once per example give the run that recomputes them every step
    (SMS spam, and 5 classes of tickets from a CSV)."""
    if classes == 2:
        run_args = lambda out, *extra: tiny_spam_args(data, out, *extra)  # noqa: E731
    else:
        run_args = ticket_run_args(tmp_path)
    runs = {}
    for cache in ("true", "false"):
        out = tmp_path / cache
        args = run_args(out, "finetune.trainable=last_block", "train.eval_every=3", f"train.cache_features={cache}")
        code, _, err = cli(capsys, *args)
        assert code == 0, err
        assert ("feature cache: blocks 0-0 are frozen" in err) == (cache == "true"), err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[cache] = rows, json.loads((out / "metrics.json").read_text()), weights(out / "best")
    (rows, metrics, best), (plain_rows, plain_metrics, plain_best) = runs["true"], runs["false"]
    assert [r["split"] for r in rows] == [r["split"] for r in plain_rows] and len(rows) == 20
    assert len(metrics["test"]["labels"]) == classes
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, plain_rows)) < 1e-5
    assert [r.get("accuracy") for r in rows] == [r.get("accuracy") for r in plain_rows]
    for split in ("train", "val", "test"):
        assert metrics[split]["confusion_matrix"] == plain_metrics[split]["confusion_matrix"]
        assert metrics[split]["loss"] == pytest.approx(plain_metrics[split]["loss"], abs=1e-5)
    assert best.keys() == plain_best.keys()
    # 1e-4, not 1e-5: the key bias has a zero gradient in exact arithmetic (softmax ignores a shift
    # shared by all keys), so Adam scales rounding noise there up to lr-sized steps. Elsewhere: < 1e-7.
    assert all(torch.allclose(best[k], plain_best[k], atol=1e-4) for k in best)
    assert all(torch.allclose(best[k], plain_best[k], atol=1e-7) for k in best if k != "gpt.blocks.1.attn.qkv.bias")

    # Nothing to cache when the frozen layers draw dropout noise, or when every layer trains.
    for extra in (("finetune.trainable=last_block", "model.dropout=0.1"), ("finetune.trainable=all",)):
        code, _, err = cli(capsys, *run_args(tmp_path / "other", "train.epochs=1", "overwrite=true", *extra))
        assert code == 0 and "feature cache" not in err, err


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, capsys):
    """54 training messages: batches of 12 end with one of 6; micro-batches of 4 x 3 end with 4 + 2.
    The loss is normalised over all targets of a step, so both runs see the same gradients
    (averaging each micro-batch instead would weight the last 2 messages double)."""
    data = small_spam_file(tmp_path / "sms.tsv", per_label=34)  # 68 -> 54 train, 7 val, 7 test
    settings = ("train.epochs=1", "train.lr=1e-4", "data.val_fraction=0.1", "data.test_fraction=0.1")
    one = tiny_spam_args(data, tmp_path / "one", "train.batch_size=12", *settings)
    accumulated = tiny_spam_args(data, tmp_path / "acc", "train.batch_size=4", "train.grad_accum_steps=3", *settings)
    assert cli(capsys, *one)[0] == 0 and cli(capsys, *accumulated)[0] == 0
    a, b = weights(tmp_path / "one" / "checkpoints" / "step-0000005"), weights(tmp_path / "acc" / "checkpoints" / "step-0000005")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # per-micro-batch means: 1e-4
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "acc")]
    losses = [[r["loss"] for r in run if r["split"] == "train"] for run in rows]
    assert len(losses[0]) == len(losses[1]) == 5 and max(abs(x - y) for x, y in zip(*losses)) < 1e-6


def test_bad_data_files_name_file_and_line(tmp_path, capsys):
    cases = {
        "notab.tsv": ("ham\tfine\nspam no tab here\n", "notab.tsv:2: no tab"),
        "label.tsv": ("ham\tfine\nham\tok\nspamm\ttypo\n", "label.tsv:3: unknown label 'spamm'"),
        "empty.tsv": ("", "empty.tsv: no records"),
        "latin1.tsv": (None, "latin1.tsv:2: not UTF-8"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is None:
            path.write_bytes(b"ham\tok\nham\tcaf\xe9\n")
        else:
            path.write_text(content)
        assert message in one_line_error(capsys, *tiny_spam_args(path, tmp_path / "out")), name
    assert "missing.tsv: cannot read data file" in one_line_error(capsys, *tiny_spam_args(tmp_path / "missing.tsv", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_config_values_name_the_key(tmp_path, data, capsys):
    for override, key in [("train.epochs=-1", "train.epochs"), ("train.batch_size=two", "train.batch_size"),
                          ("trian.epochs=1", "trian"), ("finetune.n_blocks=0", "finetune.n_blocks")]:
        assert key in one_line_error(capsys, *tiny_spam_args(data, tmp_path / "out", override))
    assert "n_blocks=9" in one_line_error(capsys, *tiny_spam_args(
        data, tmp_path / "out", "finetune.trainable=last_n_blocks", "finetune.n_blocks=9"))


def test_pretrained_offline_says_what_to_do(tmp_path, data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = [a for a in tiny_spam_args(data, tmp_path / "out") if not a.startswith("model.")]
    result = subprocess.run([sys.executable, "-m", "finetune", *args, "model.name=gpt2", "model.init=pretrained"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "model.init=random" in result.stderr and "local" in result.stderr


def test_schedule_early_stopping_bf16_and_last_position(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = tiny_spam_args(data, out, "train.schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.1",
                          "train.eval_every=2", "train.patience=2", "train.mixed_precision=bf16",
                          "model.pool=last_position", "train.best_metric=accuracy", "train.best_mode=max")
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3] + [
        1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 11)) for step in range(3, 14)]  # 14 steps planned
    assert lrs == pytest.approx(expected[: len(lrs)], rel=1e-9)
    evals = [r for r in rows if r["split"] == "val"]
    accuracies = [r["accuracy"] for r in evals]
    best_at = accuracies.index(max(accuracies))
    assert len(lrs) < 14 and len(evals) == best_at + 3  # stopped `patience` evaluations after the best
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["pool"] == "last_position" and config["task"] == "classification"
    assert json.loads((out / "metrics.json").read_text())["val"]["accuracy"] == max(accuracies)


def test_a_run_records_the_precision_accelerate_was_launched_with(tmp_path, data, capsys, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets this variable; config.yaml keeps the user's null,
    metrics.json says what ran."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_spam_args(data, out, "train.epochs=1"))
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["environment"]["mixed_precision"] == "bf16"
    assert "mixed_precision: null" in (out / "config.yaml").read_text()
    assert "mixed precision bf16" in err
