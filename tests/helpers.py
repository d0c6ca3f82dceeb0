"""Helpers for tests that run recipes through the CLI on small data."""

from __future__ import annotations

from pathlib import Path

from finetune.datasets import SMS_SPAM, bundled

from finetune.cli import main


def small_spam_file(path: Path, per_label: int = 40) -> Path:
    """The first `per_label` ham and spam lines of the real SMS Spam Collection."""
    lines = bundled(SMS_SPAM).read_text(encoding="utf-8").splitlines()
    ham = [line for line in lines if line.startswith("ham\t")][:per_label]
    spam = [line for line in lines if line.startswith("spam\t")][:per_label]
    path.write_text("\n".join(ham + spam) + "\n", encoding="utf-8")
    return path


def classifier_for(config, labels=("ham", "spam")):
    """The classifier a classification run builds for `config`, trainable parts chosen."""
    from finetune.recipes.classification import RECIPE
    from finetune.recipes.labelled_data import LabelledData

    from finetune.training.trainable import configure_trainable

    return configure_trainable(RECIPE.build_model(config, LabelledData({}, list(labels))), config)


def tiny_spam_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments for a seconds-long spam run of gpt2-tiny on `data`."""
    return [
        "run", "spam", "--quiet", f"data.path={data}", f"output_dir={out}",
        "model.name=gpt2-tiny", "model.init=random", "finetune.trainable=all",
        "train.epochs=2", "train.batch_size=8", "train.lr=1e-3", "data.max_length=32", *extra,
    ]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 with exactly one line on stderr and no traceback; return that line."""
    code, _, err = cli(capsys, *argv)
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


TEAMS = ("billing", "shipping", "returns", "technical", "account", "sales")
_TEAM_WORDS = {
    "billing": ["invoice", "charge", "refund", "payment", "card", "billed"],
    "shipping": ["parcel", "courier", "delivery", "tracking", "shipped", "late"],
    "returns": ["return", "exchange", "label", "broken", "wrong", "size"],
    "technical": ["error", "crash", "login", "bug", "update", "screen"],
    "account": ["password", "email", "profile", "username", "settings", "locked"],
    "sales": ["quote", "discount", "bulk", "pricing", "offer", "plan"],
}
_COMMON = ["please", "help", "my", "order", "today", "the", "again", "thanks"]


def ticket_frame(classes: int = 6, per_class: int = 20, seed: int = 0):
    """Support tickets: `ticket_id`, `body` (some with newlines, commas and quotes), `team`."""
    import random

    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for i in range(per_class):
        for team in TEAMS[:classes]:
            words = rng.choices(_TEAM_WORDS[team], k=rng.randint(3, 8)) + rng.choices(_COMMON, k=3)
            rng.shuffle(words)
            body = " ".join(words)
            if i % 3 == 0:
                body = f'Hello,\n{body}, "urgent", thanks'
            rows.append({"ticket_id": len(rows) + 1, "body": body, "team": team})
    return pd.DataFrame(rows)


def tiny_classification_args(out: Path, *extra: str) -> list[str]:
    """CLI arguments for a seconds-long classification run of gpt2-tiny (add data.* settings)."""
    return ["run", "classification", "--quiet", "--config", "classification_tiny", f"output_dir={out}",
            "train.epochs=2", "train.batch_size=8", "data.max_length=32", *extra]


def ticket_run_args(directory: Path, classes: int = 5, per_class: int = 16):
    """(out, *extra) -> CLI arguments for a tiny classification run on generated tickets written to `directory`."""
    path = directory / "tickets.csv"
    ticket_frame(classes=classes, per_class=per_class).to_csv(path, index=False)
    return lambda out, *extra: tiny_classification_args(
        out, f"data.path={path}", "data.text_field=body", "data.label_field=team", *extra)


def run_killed_and_resumed(capsys, monkeypatch, args, root: Path, checkpoints_before_kill: int) -> tuple[Path, Path]:
    """`args(out)` run to the end in root/full, and in root/cut stopped by Ctrl-C right after its n-th
    checkpoint, then resumed; returns both output directories for the caller to compare."""
    from finetune.training.trainer import Trainer

    assert cli(capsys, *args(root / "full"))[0] == 0
    original, saves = Trainer.save_checkpoint, [0]

    def save_then_die(self):
        original(self)
        saves[0] += 1
        if saves[0] == checkpoints_before_kill:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    assert cli(capsys, *args(root / "cut"))[0] == 130
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    code, _, err = cli(capsys, *args(root / "cut"), "resume=true")
    assert code == 0, err
    return root / "full", root / "cut"


def assert_same_files(a: Path, b: Path, weights: tuple[str, ...], texts: tuple[str, ...]) -> None:
    """Safetensors files with bit-identical tensors, and text files with identical contents."""
    import torch
    from safetensors.torch import load_file

    for name in weights:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    for name in texts:
        assert (a / name).read_text() == (b / name).read_text(), name
