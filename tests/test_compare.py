"""Comparing runs: `finetune runs` lists finished, interrupted and failed runs with the right states and
their own metrics; `finetune sweep` runs an Optuna search whose trials are ordinary runs."""

import json

from tests.helpers import cli, small_spam_file, tiny_spam_args


def test_runs_lists_finished_interrupted_and_failed_runs(tmp_path, capsys, monkeypatch):
    from finetune.trainer import Trainer

    data = small_spam_file(tmp_path / "sms.tsv")
    root = tmp_path / "runs"
    for lr in ("1e-3", "5e-4", "2e-4"):
        assert cli(capsys, *tiny_spam_args(data, root / f"lr{lr}", "train.epochs=1", f"train.lr={lr}"))[0] == 0
    original = Trainer.save_checkpoint

    def stop(self):
        original(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", stop)
    assert cli(capsys, *tiny_spam_args(data, root / "stopped", "train.epochs=2"))[0] == 130
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    code, _, err = cli(capsys, *tiny_spam_args(data, root / "diverged", "train.epochs=1", "train.lr=1e9"))
    assert code == 2 and "non-finite" in err

    code, out, _ = cli(capsys, "runs", str(root), "--json")
    rows = {r["run"]: r for r in json.loads(out)}
    assert {name: r["state"] for name, r in rows.items()} == {
        "lr1e-3": "finished", "lr5e-4": "finished", "lr2e-4": "finished", "stopped": "interrupted", "diverged": "failed"}
    assert "non-finite" in rows["diverged"]["error"]
    for name in ("lr1e-3", "lr5e-4", "lr2e-4"):
        metrics = json.loads((root / name / "metrics.json").read_text())
        assert rows[name]["test.accuracy"] == metrics["test"]["accuracy"] and rows[name]["seconds"] > 0
        assert rows[name]["train.lr"] == float(name[2:])  # the setting that differs is a column
    assert "test.accuracy" not in rows["stopped"] and rows["stopped"]["epochs"] > 0

    code, text, _ = cli(capsys, "runs", str(root), "--sort", "test.accuracy", "--descending")
    lines = text.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["run", "recipe", "model", "trainable"] and len(lines) == 6
    column = lines[0].split().index("test.accuracy")
    shown = [float(line.split()[column]) for line in lines[1:4]]
    assert shown == sorted(shown, reverse=True) and [line.split()[0] for line in lines[4:]] == ["diverged", "stopped"]
    code, csv_text, _ = cli(capsys, "runs", str(root), "--csv")
    assert csv_text.splitlines()[0].startswith("run,recipe,model,trainable") and len(csv_text.splitlines()) == 6


def test_a_run_killed_outright_is_interrupted_not_running(tmp_path, capsys):
    data = small_spam_file(tmp_path / "sms.tsv")
    assert cli(capsys, *tiny_spam_args(data, tmp_path / "run", "train.epochs=1"))[0] == 0
    state = tmp_path / "run" / "run_state.json"
    state.write_text(json.dumps({"state": "running", "pid": 2**22 + 12345, "segment_start": 0, "seconds": 1.0}))
    code, out, _ = cli(capsys, "runs", str(tmp_path), "--json")
    assert json.loads(out)[0]["state"] == "interrupted"
