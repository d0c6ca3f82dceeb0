"""Helpers for tests that run recipes through the CLI on small data."""

from __future__ import annotations

from pathlib import Path

from finetune.data import SMS_SPAM, bundled
from finetune.cli import main


def small_spam_file(path: Path, per_label: int = 40) -> Path:
    """The first `per_label` ham and spam lines of the real SMS Spam Collection."""
    lines = bundled(SMS_SPAM).read_text(encoding="utf-8").splitlines()
    ham = [line for line in lines if line.startswith("ham\t")][:per_label]
    spam = [line for line in lines if line.startswith("spam\t")][:per_label]
    path.write_text("\n".join(ham + spam) + "\n", encoding="utf-8")
    return path


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
