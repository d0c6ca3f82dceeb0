"""Experiment trackers through accelerate: TensorBoard's event files, read back with TensorBoard's own
reader, hold metrics.jsonl's values, also across a kill and a resume; MLflow's store (a database file in
the run directory, no server) holds the config and the metrics; a missing package is one line."""

import json
import math

import pytest

from tests.helpers import (
    cli,
    one_line_error,
    run_killed_and_resumed,
    small_spam_file,
    tiny_spam_args,
)


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(run) -> dict[str, list[tuple[int, float]]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    found = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("split", "step") and isinstance(value, (int, float)):
                found.setdefault(f"{row['split']}/{key}", []).append((row["step"], float(value)))
    return found


def assert_same(events, run):
    wanted = expected(run)
    for tag, values in wanted.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in values], tag  # no step missing or repeated
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for (_, a), (_, b) in zip(got, values)), tag


def test_tensorboard_holds_every_metric_also_across_a_kill_and_resume(tmp_path, capsys, monkeypatch):
    data = small_spam_file(tmp_path / "sms.tsv")
    args = lambda out: tiny_spam_args(data, out, "train.epochs=3", "train.eval_every=2", "train.checkpoint_every=2",  # noqa: E731
                                      "train.report_to=[tensorboard]")
    full, cut = run_killed_and_resumed(capsys, monkeypatch, args, tmp_path, checkpoints_before_kill=2)
    for run in (full, cut):
        events = scalars(run / "tensorboard")
        assert_same(events, run)
        metrics = json.loads((run / "metrics.json").read_text())
        assert events["final/test/accuracy"][-1][1] == pytest.approx(metrics["test"]["accuracy"])
    assert expected(full) == expected(cut)  # the resumed run logged what the uninterrupted one did


def test_mlflow_store_in_the_run_directory_holds_params_and_metrics(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    data = small_spam_file(tmp_path / "sms.tsv")
    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_spam_args(data, out, "train.epochs=1", "train.report_to=[mlflow]"))
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"] == "gpt2-tiny"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    want = expected(out)["train/loss"]
    assert [step for step, _ in history] == [step for step, _ in want]
    assert [value for _, value in history] == pytest.approx([value for _, value in want])  # not nested: pytest 9.2
    assert run.data.metrics["final/test/accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["accuracy"])


def test_an_unknown_or_missing_tracker_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    data = small_spam_file(tmp_path / "sms.tsv")
    assert "report_to" in one_line_error(capsys, *tiny_spam_args(data, tmp_path / "a", "train.report_to=[neptune]"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    line = one_line_error(capsys, *tiny_spam_args(data, tmp_path / "b", "train.report_to=[wandb]"))
    assert 'pip install "finetune-gpt2[wandb]"' in line
    assert not (tmp_path / "b").exists()
