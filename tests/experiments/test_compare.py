"""Comparing runs: `finetune runs` lists finished, interrupted and failed runs with the right states and
their own metrics; `finetune sweep` runs an Optuna search whose trials are ordinary runs."""

import json

from tests.helpers import cli, small_spam_file, tiny_spam_args


def test_runs_lists_finished_interrupted_and_failed_runs(tmp_path, capsys, monkeypatch):
    from finetune.training.trainer import Trainer

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


def sweep_args(data, out, *extra):
    return ["sweep", "spam", "train.lr=[1e-3,5e-4]", "finetune.trainable=[all,last_block]", "--config", "spam_tiny",
            "--set", f"data.path={data}", "--set", "data.max_length=32", "--set", "train.epochs=1",
            "--metric", "test.accuracy", "--out", str(out), *extra]


def test_a_grid_sweep_killed_mid_way_resumes_without_repeating_a_finished_trial(tmp_path, capsys, monkeypatch):
    import hashlib

    import finetune.training.recipe
    from finetune.training.trainer import Trainer

    data = small_spam_file(tmp_path / "sms.tsv")
    out = tmp_path / "sweep"
    trained, original_train, original_save = [], finetune.training.recipe.train, Trainer.save_checkpoint

    def counted(recipe, config, *args, **kwargs):
        trained.append(config.output_dir)
        return original_train(recipe, config, *args, **kwargs)

    def killed_in_the_third(self):
        original_save(self)
        if len(trained) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune.training.recipe, "train", counted)
    monkeypatch.setattr(Trainer, "save_checkpoint", killed_in_the_third)
    assert cli(capsys, *sweep_args(data, out))[0] == 130
    finished = {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("trial-*/metrics.json")}
    assert sorted(finished) == ["trial-000", "trial-001"]

    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    trained.clear()
    code, text, err = cli(capsys, *sweep_args(data, out))
    assert code == 0, err
    assert [p.rsplit("/", 1)[-1] for p in trained] == ["trial-003", "trial-004"]  # the cut trial again, then the last
    assert {n: hashlib.sha256((out / n / "metrics.json").read_bytes()).hexdigest() for n in finished} == finished
    assert "best test.accuracy" in text and (out / "sweep.png").stat().st_size > 0

    code, table, _ = cli(capsys, "runs", str(out), "--json")
    rows = {r["run"]: r for r in json.loads(table)}
    assert {n: r["state"] for n, r in rows.items()} == {"trial-000": "finished", "trial-001": "finished",
                                                         "trial-002": "interrupted", "trial-003": "finished",
                                                         "trial-004": "finished"}
    for name in ("trial-000", "trial-001", "trial-003", "trial-004"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        for split in ("val", "test"):
            for key, value in metrics[split].items():
                if isinstance(value, (int, float)):
                    assert rows[name][f"{split}.{key}"] == value, (name, split, key)
    swept = {(rows[n]["train.lr"], rows[n]["trainable"]) for n in ("trial-000", "trial-001", "trial-003", "trial-004")}
    assert len(swept) == 4  # every grid point once


import pytest  # noqa: E402


@pytest.mark.parametrize("extra, expected", [
    (["train.lrr=[1e-3]"], "train.lrr"),
    (["train.epochs=[two]"], "train.epochs"),
    (["train.lr=uniform(1e-3,1e-3)", "--sampler", "tpe", "--trials", "2"], "empty range"),
    (["train.lr=[]"], "an empty list"),
    (["--set", "train.report_to=[neptune]"], "report_to"),
    (["--metric", "val.bleu"], "--metric val.bleu"),
    (["--storage", "nosuchdb://nowhere"], "--storage nosuchdb://nowhere: Optuna cannot open it"),
])
def test_bad_sweeps_are_one_line_before_any_training(tmp_path, capsys, monkeypatch, extra, expected):
    import finetune.training.recipe
    from tests.helpers import one_line_error

    monkeypatch.setattr(finetune.training.recipe, "train", lambda *a, **k: pytest.fail("a trial started"))
    data = small_spam_file(tmp_path / "sms.tsv")
    argv = sweep_args(data, tmp_path / "sweep")
    if extra[0].startswith("--metric"):
        argv = argv[: argv.index("--metric")] + argv[argv.index("--metric") + 2:]
    line = one_line_error(capsys, *argv, *extra)
    assert expected in line, line
