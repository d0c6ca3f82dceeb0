"""Training survives kills, signals, damaged checkpoints and NaNs without losing or corrupting work."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from finetune.recipes.classification import ClassificationTask
from safetensors.torch import load_file

from finetune.checkpoints.atomic import CorruptCheckpoint, verify
from tests.helpers import cli, one_line_error, small_spam_file, tiny_spam_args

RUNNER = Path(__file__).parent.parent / "fault_runner.py"
# Dropout makes the RNG state part of what a resume must restore; 7 steps an epoch, 14 in all.
SETTINGS = ("model.dropout=0.1", "train.checkpoint_every=3", "train.keep_last=2", "train.eval_every=4")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_spam_file(tmp_path_factory.mktemp("data") / "sms.tsv")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run to compare against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    from finetune.cli import main

    assert main(tiny_spam_args(data, out, *SETTINGS)) == 0
    return out


def weights(directory: Path) -> dict:
    return load_file(directory / "model.safetensors")


def assert_same_result(run: Path, reference: Path) -> None:
    for kept in ("best", "checkpoints/step-0000014"):
        a, b = weights(run / kept), weights(reference / kept)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kept
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def start(point: str, out: Path, data: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"{point}.reached"
    command = [sys.executable, str(RUNNER), point, str(marker), *tiny_spam_args(data, out, *SETTINGS)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parent.parent.parent)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the planted point was never reached"
        time.sleep(0.05)
    return process, marker


@pytest.mark.parametrize("point", ["mid-epoch", "mid-eval", "mid-checkpoint-write"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(point, data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    process, _ = start(point, out, data, tmp_path)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait()
    if point == "mid-checkpoint-write":
        assert (out / "checkpoints" / ".tmp-step-0000006").is_dir()  # the half-written one, never renamed
        assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000003"]
    code, _, err = cli(capsys, *tiny_spam_args(data, out, *SETTINGS, "resume=true"))
    assert code == 0, err
    assert_same_result(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    process, _ = start("slow", out, data, tmp_path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM at step" in err and "resume=true" in err and "Traceback" not in err
    step = int(err.split("SIGTERM at step ")[1].split(":")[0])
    verify(out / "checkpoints" / f"step-{step:07d}")
    code, _, err = cli(capsys, *tiny_spam_args(data, out, *SETTINGS, "resume=true"))
    assert code == 0, err
    assert_same_result(out, reference)


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(data, reference, tmp_path, capsys):
    out = tmp_path / "run"
    process, _ = start("mid-epoch", out, data, tmp_path)  # killed at step 8: keeps step-6 and step-7 (epoch end)
    process.kill()
    process.wait()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000006", "step-0000007"]
    newest = out / "checkpoints" / "step-0000007" / "training_state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    code, _, err = cli(capsys, *tiny_spam_args(data, out, *SETTINGS, "resume=true"))
    assert code == 0, err
    assert "warning: skipping a damaged checkpoint" in err and "step-0000007" in err and "truncated" in err
    assert_same_result(out, reference)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_every_checkpoint_file_is_verified(reference, tmp_path, damage):
    import shutil

    source = reference / "checkpoints" / "step-0000014"
    for path in sorted(source.iterdir()):
        copy = tmp_path / f"{damage}-{path.name}"
        shutil.copytree(source, copy)
        target = copy / path.name
        content = target.read_bytes()
        if damage == "truncate":
            target.write_bytes(content[: len(content) // 2])
        else:
            target.write_bytes(content[:20] + bytes([content[20] ^ 0xFF]) + content[21:])
        with pytest.raises(CorruptCheckpoint, match=path.name if path.name != "manifest.json" else "manifest"):
            verify(copy)
    (tmp_path / "missing").mkdir()
    with pytest.raises(CorruptCheckpoint, match="no manifest.json"):
        verify(tmp_path / "missing")


def test_damaged_kept_model_is_reported_by_eval(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    model_file = run / "best" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    line = one_line_error(capsys, "eval", str(run))
    assert "best/model.safetensors" in line and "truncated" in line


def test_cut_directory_replacement_is_recovered(reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "best").rename(run / ".old-best")  # killed between the two renames of a best/ update
    code, printed, _ = cli(capsys, "eval", str(run), "--json")
    assert code == 0 and (run / "best").is_dir() and not (run / ".old-best").exists()
    assert json.loads(printed)["test"] == json.loads((reference / "metrics.json").read_text())["test"]


def nan_on_call(monkeypatch, n: int) -> None:
    original, calls = ClassificationTask.loss, [0]

    def loss(self, model, batch):
        calls[0] += 1
        value = original(self, model, batch)
        return value * float("nan") if calls[0] == n else value

    monkeypatch.setattr(ClassificationTask, "loss", loss)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_on_call(monkeypatch, 5)
    code, _, err = cli(capsys, *tiny_spam_args(data, out, *SETTINGS))
    line = err.strip().splitlines()[-1]  # after the run's own opening line
    assert code == 2 and "Traceback" not in err
    assert "non-finite loss at step 5 (epoch 1, batch 5)" in line and "train.on_nonfinite=skip" in line
    kept = out / "checkpoints" / "step-0000003"
    verify(kept)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]
    assert all(torch.isfinite(t).all() for t in weights(kept).values())


def test_nan_batches_can_be_skipped_and_are_counted(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    nan_on_call(monkeypatch, 5)
    code, _, err = cli(capsys, *tiny_spam_args(data, out, *SETTINGS, "train.on_nonfinite=skip"))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert math.isnan(train[4]["loss"]) and train[4]["nonfinite_skipped"] == 1 and train[-1]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(t).all() for t in weights(out / "best").values())


def test_malicious_pickle_is_refused_not_executed(tmp_path, capsys, small_hf):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for layout in ("dir", "pth"):
        if layout == "dir":
            target = tmp_path / "evil"
            target.mkdir()
            (target / "config.json").write_text((small_hf[0] / "config.json").read_text())
            torch.save({"transformer.wte.weight": Exploit()}, target / "pytorch_model.bin")
        else:
            target = tmp_path / "evil.pth"
            torch.save({"tok_emb.weight": Exploit()}, target)
        line = one_line_error(capsys, "generate", "--model", str(target), "--prompt", "hi")
        assert "cannot read weights" in line
        assert not marker.exists()
