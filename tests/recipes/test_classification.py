"""Classification on the user's own data: formats, columns, N classes, separate files, class
weights, per-class metrics, batch predictions."""

import json

import finetune.recipes.classification as classification
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from finetune.recipes.classification import (
    RECIPE,
    ClassificationConfig,
    ClassificationTask,
    class_weights,
)
from sklearn.metrics import precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight

from finetune.config import load_config
from finetune.data.tables import read_table
from tests.helpers import TEAMS, cli, ticket_frame, tiny_classification_args

COLUMNS = ("data.text_field=body", "data.label_field=team")


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    """The same 6-class tickets as CSV (quoted multi-line fields), JSONL and Parquet."""
    root = tmp_path_factory.mktemp("tickets")
    frame = ticket_frame()
    frame.to_csv(root / "tickets.csv", index=False)
    frame.to_json(root / "tickets.jsonl", orient="records", lines=True)
    frame.to_parquet(root / "tickets.parquet")
    return root, frame


def test_csv_with_quoted_multiline_fields_reads_every_record(tickets):
    root, frame = tickets
    text = (root / "tickets.csv").read_text()
    assert '"Hello,\n' in text  # really quoted, really multi-line
    for name in ("tickets.csv", "tickets.jsonl", "tickets.parquet"):
        read = read_table(root / name).frame
        assert read["body"].tolist() == frame["body"].tolist(), name
        assert [str(t) for t in read["team"]] == frame["team"].tolist(), name


def test_six_classes_from_a_csv_end_to_end(tickets, tmp_path, capsys, monkeypatch):
    root, frame = tickets
    shown = []
    plot = classification.plot_confusion
    monkeypatch.setattr(classification, "plot_confusion", lambda m, labels, *a: shown.append(labels) or plot(m, labels, *a))
    out = tmp_path / "run"
    code, printed, err = cli(capsys, "run", "classification", "--config", "classification_tiny", f"output_dir={out}",
                             f"data.path={root / 'tickets.csv'}", *COLUMNS)
    assert code == 0, err
    assert "macro f1" in printed and "class" in printed and "billing" in printed  # the summary with per-class rows
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert test["labels"] == sorted(TEAMS) and shown == [sorted(TEAMS)]
    assert set(test["per_class"]) == set(TEAMS) and sum(c["support"] for c in test["per_class"].values()) == test["n"]
    assert 0 <= test["macro_f1"] <= 1 and len(test["confusion_matrix"]) == 6
    assert set(metrics["baseline"]) == {"train", "val", "test"} and len(metrics["baseline"]["test"]["per_class"]) == 6
    assert (out / "confusion_matrix.png").stat().st_size > 0

    # Batch predictions on the test split agree with `finetune eval`.
    config = load_config(ClassificationConfig, out / "config.yaml")
    test_rows = RECIPE.prepare(config).splits["test"]
    names = test["labels"]
    pd.DataFrame({"body": [t for _, t in test_rows], "team": [names[label] for label, _ in test_rows]}).to_json(
        tmp_path / "test.jsonl", orient="records", lines=True)
    code, _, err = cli(capsys, "predict", str(out), "--data", str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "p.csv"))
    assert code == 0, err
    preds = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(preds.columns) == ["text", "predicted", "probability", *[f"p_{n}" for n in names]]
    assert np.allclose(preds[[f"p_{n}" for n in names]].sum(axis=1), 1, atol=1e-5)
    # A CSV with only the text column is valid input for predictions, with the same answers.
    pd.DataFrame({"body": [t for _, t in test_rows]}).to_csv(tmp_path / "texts.csv", index=False)
    code, _, err = cli(capsys, "predict", str(out), "--data", str(tmp_path / "texts.csv"), "--out", str(tmp_path / "q.csv"))
    assert code == 0, err
    assert pd.read_csv(tmp_path / "q.csv", keep_default_na=False).equals(preds)
    code, printed, _ = cli(capsys, "eval", str(out), "--split", "test", "--json")
    evaluated = json.loads(printed)["test"]
    assert evaluated == test
    matrix = np.zeros((6, 6), dtype=int)
    for (label, _), predicted in zip(test_rows, preds["predicted"]):
        matrix[label, names.index(predicted)] += 1
    assert matrix.tolist() == evaluated["confusion_matrix"]

    code, printed, _ = cli(capsys, "classify", str(out), "--text", "my invoice was charged twice, refund please")
    assert code == 0 and printed.split("\t")[0] in TEAMS


def test_jsonl_and_parquet_give_the_same_split_and_metrics(tickets, tmp_path, capsys):
    root, _ = tickets
    results = {}
    for name in ("tickets.csv", "tickets.jsonl", "tickets.parquet"):
        out = tmp_path / name
        code, _, err = cli(capsys, *tiny_classification_args(out, f"data.path={root / name}", *COLUMNS))
        assert code == 0, err
        config = load_config(ClassificationConfig, out / "config.yaml")
        results[name] = RECIPE.prepare(config).splits, json.loads((out / "metrics.json").read_text())
    (splits, metrics), *others = results.values()
    for other_splits, other_metrics in others:
        assert other_splits == splits
        assert other_metrics == metrics


def test_integer_labels_are_one_class_whatever_the_format(tmp_path):
    frame = ticket_frame(classes=3, per_class=10)
    frame["team"] = frame["team"].map({"billing": 2, "shipping": 10, "returns": 1})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_json(tmp_path / "t.json", orient="records")
    for name in ("t.csv", "t.json"):
        config = load_config(ClassificationConfig, None, [f"data.path={tmp_path / name}", *COLUMNS])
        assert RECIPE.prepare(config).labels == ["1", "2", "10"]  # numeric order
    config = load_config(ClassificationConfig, None, [f"data.path={tmp_path / 't.csv'}", *COLUMNS, "data.labels=[10, 2, 1]"])
    assert RECIPE.prepare(config).labels == ["10", "2", "1"]  # the listed order is the head order


def test_separate_files_and_class_weights_follow_scikit_learn(tmp_path, capsys):
    frame = ticket_frame(classes=4, per_class=12)
    frame = pd.concat([frame, frame[frame["team"] == "billing"].assign(body=lambda f: f["body"] + " again")])  # imbalance
    train, val, test = frame.iloc[::3], frame.iloc[1::3], frame.iloc[2::3]
    for name, part in (("train", train), ("val", val), ("test", test)):
        part.to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
    paths = [f"data.{s}_path={tmp_path / s}.tsv" for s in ("train", "val", "test")]
    config = load_config(ClassificationConfig, None, [*paths, *COLUMNS, "train.class_weights=balanced"])
    data = RECIPE.prepare(config)
    assert {s: len(v) for s, v in data.splits.items()} == {"train": len(train), "val": len(val), "test": len(test)}
    labels = [label for label, _ in data.splits["train"]]
    expected = compute_class_weight("balanced", classes=np.arange(4), y=np.array(labels))
    weights = class_weights(data.splits["train"], 4)
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))

    # The trainer divides the summed loss by `count`: together, F.cross_entropy's weighted mean. (Over
    # the whole training set balanced weights sum to n, so a batch of it tells the two apart.)
    task = ClassificationTask(data.labels, weights)
    batch_labels = torch.tensor(labels[:9])
    assert abs(weights[batch_labels].sum().item() - 9) > 0.25  # 9.375 here
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    batch = {"labels": batch_labels, "host_labels": labels[:9], "input_ids": None, "attention_mask": None}
    model = lambda *args: logits  # noqa: E731
    mean = task.loss(model, batch) / task.count(batch)
    assert torch.allclose(mean, F.cross_entropy(logits, batch_labels, weight=weights))
    assert not torch.allclose(mean, F.cross_entropy(logits, batch_labels))

    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_classification_args(out, *paths, *COLUMNS, "train.class_weights=balanced",
                                                         "data.format=tsv"))
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] == len(test)


def test_per_class_metrics_equal_scikit_learn():
    labels, predictions = [0, 0, 1, 2, 2, 2, 1, 0], [0, 1, 1, 2, 0, 2, 2, 0]
    m = classification.classification_metrics(labels, predictions, ["a", "b", "c"], 0.5)
    p, r, f, s = precision_recall_fscore_support(labels, predictions, labels=[0, 1, 2], zero_division=0)
    assert [m["per_class"][n]["f1"] for n in "abc"] == pytest.approx(f.tolist())
    assert [m["per_class"][n]["support"] for n in "abc"] == s.tolist()
    assert m["macro_f1"] == pytest.approx(f.mean()) and m["f1"] == pytest.approx(f.mean())
    assert m["weighted_f1"] == pytest.approx(float(np.average(f, weights=s)))
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]  # rows: true class
    binary = classification.classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["ham", "spam"], positive=1)
    assert binary["recall"] == 0.5 and binary["precision"] == 1.0


@pytest.mark.parametrize("method", [("finetune.trainable=last_block",),
                                    ("finetune.trainable=lora", "lora.rank=4", "lora.targets=[all-linear]"),
                                    ("finetune.trainable=last_n_blocks", "finetune.n_blocks=2"),
                                    ("finetune.trainable=head", "train.mixed_precision=bf16")],
                         ids=["last_block", "lora", "last_n_blocks", "head_bf16"])
def test_five_classes_with_every_way_of_training(tmp_path, capsys, method):
    ticket_frame(classes=5, per_class=12).to_parquet(tmp_path / "t.parquet")
    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_classification_args(out, f"data.path={tmp_path / 't.parquet'}", *COLUMNS, *method))
    assert code == 0, err
    saved = json.loads((out / "best" / "adapter_config.json").read_text())
    assert saved["labels"] == sorted(TEAMS[:5]) and saved["num_classes"] == 5
    code, printed, _ = cli(capsys, "eval", str(out), "--json")
    assert json.loads(printed)["test"] == json.loads((out / "metrics.json").read_text())["test"]


def test_a_run_reads_its_data_once(tmp_path, capsys):
    """Read and split once per run: one duplicate-text warning, not one per stage (train, eval, baseline)."""
    frame = ticket_frame(classes=3, per_class=10)
    pd.concat([frame, frame.iloc[:1]]).to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli(capsys, *tiny_classification_args(tmp_path / "run", f"data.path={tmp_path / 't.csv'}", *COLUMNS,
                                                         "train.epochs=1"))
    assert code == 0, err
    assert err.count("duplicate text(s) kept") == 1, err


def test_baseline_equals_a_scikit_learn_pipeline_on_the_same_split():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, log_loss
    from sklearn.pipeline import make_pipeline

    frame = ticket_frame(classes=4, per_class=15)
    data = classification.LabelledData({"train": [], "test": []}, sorted(TEAMS[:4]))
    rows = [(data.labels.index(team), body) for body, team in zip(frame["body"], frame["team"])]
    data.splits = {"train": rows[:40], "test": rows[40:]}  # every class in both (rows cycle through them)
    ours = classification.tfidf_baseline(data)["test"]
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(C=10.0, max_iter=1000))
    pipeline.fit([t for _, t in data.splits["train"]], [label for label, _ in data.splits["train"]])
    texts, labels = [t for _, t in data.splits["test"]], [label for label, _ in data.splits["test"]]
    predicted = pipeline.predict(texts)
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert ours["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert ours["loss"] == pytest.approx(log_loss(labels, pipeline.predict_proba(texts)))
    assert ours["accuracy"] < 1.0 or ours["loss"] > 0  # a real task, not a degenerate one
