"""Multi-label classification and regression, end to end: metrics equal scikit-learn's and scipy's on the
run's own predictions; every way of using the model (classify, predict, serve, transformers and PEFT
exports, transformers' pipeline) answers in the task's shape with the same numbers; LoRA and the
feature cache work with label vectors and numbers."""

import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    mean_absolute_error,
    precision_recall_fscore_support,
    r2_score,
    root_mean_squared_error,
)

from finetune.cli import main
from finetune.config import load_config
from finetune.inference.loading import load_classifier
from finetune.inference.predict import Predictions, predict
from finetune.recipes import multilabel, regression
from tests.helpers import cli

RUNS = {
    "multilabel": ["--config", "multilabel_tiny", "train.epochs=2"],
    "regression": ["--config", "regression_tiny", "train.epochs=3"],
}
RECIPES = {"multilabel": multilabel.RECIPE, "regression": regression.RECIPE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    for name, args in RUNS.items():
        assert main(["run", name, "--quiet", *args, f"output_dir={root / name}"]) == 0
    return root


def split_of(run, name, split="test"):
    recipe = RECIPES[name]
    data = recipe.prepare(load_config(recipe.Config, run / "config.yaml"))
    return [text for _, text in data.splits[split]], np.array([label for label, _ in data.splits[split]])


def test_multilabel_metrics_equal_scikit_learn_on_the_runs_own_predictions(runs):
    run = runs / "multilabel"
    texts, truth = split_of(run, "multilabel")
    loaded = load_classifier(str(run))
    predicted = predict(loaded.classifier_model, loaded.meta, texts).chosen().numpy().astype(int)
    ours = json.loads((run / "metrics.json").read_text())["test"]
    assert truth.sum() > 0 and 0 < predicted.sum() < predicted.size  # a real task, not a degenerate one
    assert ours["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"), abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-12)
    assert ours["subset_accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    assert ours["hamming_loss"] == pytest.approx(hamming_loss(truth, predicted), abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    for k, name in enumerate(loaded.meta["labels"]):
        assert ours["per_label"][name] == pytest.approx(
            {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}, abs=1e-12
        )
    assert ours["micro_f1"] > 0.5


def test_regression_metrics_equal_scikit_learn_and_scipy_on_the_runs_own_predictions(runs):
    run = runs / "regression"
    texts, truth = split_of(run, "regression")
    loaded = load_classifier(str(run))
    predicted = predict(loaded.classifier_model, loaded.meta, texts).values.numpy()
    ours = json.loads((run / "metrics.json").read_text())["test"]
    y, p = truth[:, 0], predicted[:, 0]
    # evaluation read cached features, predict() the texts: the same numbers up to float rounding
    assert ours["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-4)
    assert ours["rmse"] == pytest.approx(root_mean_squared_error(y, p), rel=1e-4)
    assert ours["r2"] == pytest.approx(r2_score(y, p), abs=1e-5)
    assert ours["pearson"] == pytest.approx(pearsonr(y, p).statistic, abs=1e-5)
    assert ours["spearman"] == pytest.approx(spearmanr(y, p).statistic, abs=1e-5)
    assert ours["per_target"]["answer"]["r2"] == ours["r2"]
    assert ours["r2"] > 0.9 and ours["mae"] < 5  # in the answer's units: the standardisation is undone
    baseline = json.loads((run / "metrics.json").read_text())["baseline"]
    assert abs(baseline["mean"]["test"]["r2"]) < 0.05


def test_standardised_targets_and_the_loss_in_transformers_terms():
    """MSE on standardised targets averaged over texts and targets (MSELoss), BCE averaged likewise
    (BCEWithLogitsLoss): the trainer divides each summed loss by the task's count."""
    torch.manual_seed(0)
    outputs, targets = torch.randn(5, 2), torch.randn(5, 2) * 10 + 3
    task = regression.RegressionTask(["a", "b"], [3.0, -1.0], [10.0, 2.0])
    batch = {"labels": targets, "host_labels": targets.tolist()}
    expected = torch.nn.MSELoss()(outputs, (targets - torch.tensor([3.0, -1.0])) / torch.tensor([10.0, 2.0]))
    assert task._loss(outputs, targets, "sum") / task.count(batch) == pytest.approx(expected.item(), rel=1e-6)
    flags = (torch.rand(5, 3) > 0.5).float()
    ml = multilabel.MultiLabelTask(["x", "y", "z"], [0.5] * 3, torch.tensor([1.0, 2.0, 3.0]))
    model = lambda *_args, **_kw: outputs[:, :1].repeat(1, 3)  # noqa: E731
    summed = ml.loss(model, {"input_ids": None, "attention_mask": None, "labels": flags})
    reference = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 3.0]))(outputs[:, :1].repeat(1, 3), flags)
    assert summed / ml.count({"host_labels": [0] * 5}) == pytest.approx(reference.item(), rel=1e-6)


def test_positive_weights_are_negatives_over_positives():
    rows = [([1.0, 0.0], "a"), ([1.0, 1.0], "b"), ([0.0, 0.0], "c"), ([1.0, 0.0], "d")]
    assert multilabel.positive_weights(rows).tolist() == pytest.approx([1 / 3, 3.0])


def served(loaded, texts):
    """/v1/classify's answer for `texts` and the /v1/models card, from a server in this process."""
    from tests.serve.test_serve import Running, post

    from finetune.serve.app import create_app

    running = Running(create_app(loaded))
    try:
        code, reply = post(running.url, "/v1/classify", {"input": texts})
        card = json.loads(urllib.request.urlopen(running.url + "/v1/models").read())["data"][0]
    finally:
        running.close()
    assert code == 200, reply
    return reply["data"], card


@pytest.mark.parametrize("name", RUNS)
def test_classify_predict_and_serve_answer_in_the_tasks_shape(runs, name, tmp_path, capsys):
    run = runs / name
    texts, _ = split_of(run, name)
    texts = texts[:6]
    loaded = load_classifier(str(run))
    expected = predict(loaded.classifier_model, loaded.meta, texts)
    code, printed, err = cli(capsys, "classify", str(run), *[arg for t in texts for arg in ("--text", t)])
    assert code == 0, err
    lines = printed.splitlines()
    assert len(lines) == len(texts)
    field = "text" if name == "multilabel" else "instruction"
    pd.DataFrame({field: texts}).to_csv(tmp_path / "in.csv", index=False)
    assert main(["predict", str(run), "--data", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv")]) == 0
    frame = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    answers, card = served(loaded, texts)
    assert card["problem_type"] == loaded.meta["problem_type"]
    if name == "multilabel":
        sets = expected.label_sets()
        assert any(len(s) != 1 for s in sets)  # sets of labels, not one class per text
        for line, labels in zip(lines, sets):
            assert line.split("\t")[0] == (",".join(labels) or "-")
        assert frame["predicted"].tolist() == [",".join(s) for s in sets]
        assert list(frame.columns) == ["text", "predicted", *[f"p_{n}" for n in loaded.meta["labels"]]]
        for row, labels, values in zip(answers, sets, expected.values):
            assert row["labels"] == labels and "label" not in row
            assert list(row["probabilities"].values()) == pytest.approx(values.tolist(), abs=1e-9)
        assert card["thresholds"] == dict.fromkeys(loaded.meta["labels"], 0.5)
    else:
        values = expected.values[:, 0].tolist()
        assert [float(line.split("\t")[0].removeprefix("answer=")) for line in lines] == pytest.approx(values, rel=1e-5)
        assert list(frame.columns) == ["text", "predicted_answer"]
        assert frame["predicted_answer"].tolist() == pytest.approx(values, abs=1e-9)
        assert [row["values"]["answer"] for row in answers] == pytest.approx(values, abs=1e-9)
        assert max(values) > 20  # in the answer's units (standardised outputs lie within a few units of 0)


def our_logits(model, meta, texts):
    """The head's raw outputs, un-standardised for regression (what transformers' export answers)."""
    predictions = predict(model, meta, texts)
    if meta["problem_type"] == "regression":
        return predictions.values
    return torch.logit(predictions.values)


@pytest.mark.parametrize("name", RUNS)
def test_transformers_export_gives_our_logits_and_the_pipeline_our_answers(runs, name, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run = runs / name
    texts, _ = split_of(run, name)
    texts = texts[:8]
    loaded = load_classifier(str(run))
    ours = predict(loaded.classifier_model, loaded.meta, texts)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["problem_type"] == loaded.meta["problem_type"]
    assert list(config["id2label"].values()) == loaded.meta["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        for text, row in zip(texts, our_logits(loaded.classifier_model, loaded.meta, texts)):
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double()
            assert logits.tolist() == pytest.approx(row.tolist(), abs=1e-5 * max(1.0, row.abs().max().item()))
    classify = pipeline("text-classification", model=str(tmp_path / "hf"))
    if name == "multilabel":  # sigmoid scores for every label; thresholds are applied by finetune, not the pipeline
        for answer, values in zip(classify(texts, top_k=None), ours.values):
            scores = {a["label"]: a["score"] for a in answer}
            assert [scores[n] for n in ours.names] == pytest.approx(values.tolist(), abs=1e-5)
    else:  # no function applied: the score is the prediction
        assert [a["score"] for a in classify(texts)] == pytest.approx(ours.values[:, 0].tolist(), rel=1e-5)
    back = load_classifier(str(tmp_path / "hf"))  # finetune reads the export back with the same interface
    again = predict(back.classifier_model, back.meta, texts)
    assert back.meta["problem_type"] == loaded.meta["problem_type"]
    torch.testing.assert_close(again.values, ours.values, rtol=1e-4, atol=1e-5)
    if name == "multilabel":
        assert again.label_sets() == ours.label_sets()


@pytest.mark.parametrize("name", RUNS)
def test_a_lora_run_exports_to_peft_with_its_interface(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "lora"
    assert main(["run", name, "--quiet", *RUNS[name], f"output_dir={out}", "train.epochs=1",
                 "finetune.trainable=lora", "lora.rank=4", "train.lr=3e-3"]) == 0
    texts, _ = split_of(out, name)
    texts = texts[:6]
    loaded = load_classifier(str(out))
    ours = predict(loaded.classifier_model, loaded.meta, texts)
    assert main(["export", str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0
    card = (tmp_path / "peft" / "README.md").read_text()
    assert f"problem_type={loaded.meta['problem_type']!r}" in card
    base = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "peft" / "base", num_labels=len(ours.names), problem_type=loaded.meta["problem_type"],
        pad_token_id=50256)
    model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "peft")
    with torch.no_grad():
        for text, values in zip(texts, ours.values):
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].double()
            answer = logits.sigmoid() if name == "multilabel" else logits  # regression: in the target's units
            assert answer.tolist() == pytest.approx(values.tolist(), rel=1e-5, abs=1e-5)
    back = load_classifier(str(tmp_path / "peft"))
    assert back.meta["problem_type"] == loaded.meta["problem_type"] and back.meta["labels"] == ours.names
    torch.testing.assert_close(predict(back.classifier_model, back.meta, texts).values, ours.values, rtol=1e-4, atol=1e-5)


def test_checkpoints_from_before_problem_types_are_single_label():
    from finetune.checkpoints.interface import check_usable, interface_of

    old = {"task": "classification", "labels": ["ham", "spam"], "num_classes": 2, "max_length": 8, "keep": "start",
           "pool": "last_token"}
    check_usable(old, "test")
    assert interface_of(old).problem_type == "single_label_classification"
    assert Predictions.from_logits(torch.tensor([[0.0, 1.0]]), old).answers()[0]["label"] == "spam"


@pytest.mark.parametrize("name", RUNS)
def test_the_feature_cache_gives_the_metrics_of_an_uncached_run(name, tmp_path):
    """A frozen trunk (last block trained, dropout 0): features cached once per example, labels that are
    vectors or numbers carried beside them."""
    metrics = {}
    for cache in (True, False):
        out = tmp_path / str(cache)
        args = [*RUNS[name], "train.epochs=1", "finetune.trainable=last_block", f"train.cache_features={cache}"]
        assert main(["run", name, "--quiet", *args, f"output_dir={out}"]) == 0
        metrics[cache] = json.loads((out / "metrics.json").read_text())["test"]
    keys = ("micro_f1", "hamming_loss", "loss") if name == "multilabel" else ("r2", "mae", "loss")
    for key in keys:
        assert metrics[True][key] == pytest.approx(metrics[False][key], rel=1e-4, abs=1e-5), key


def test_several_targets_and_label_columns(tmp_path, capsys):
    """Two numeric columns (regression), several 0/1 columns and separated labels (multi-label)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50, 120), rng.integers(0, 50, 120)
    frame = pd.DataFrame({"text": [f"{x} and {y}" for x, y in zip(a, b)], "first": a, "total": a + b})
    frame.to_csv(tmp_path / "numbers.csv", index=False)
    out = tmp_path / "two"
    code, _, err = cli(capsys, "run", "regression", "--quiet", "--config", "regression_tiny", f"output_dir={out}",
                       f"data.path={tmp_path / 'numbers.csv'}", "data.text_field=text", "data.target_fields=[first,total]",
                       "train.epochs=1")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert list(metrics["per_target"]) == ["first", "total"]
    assert metrics["r2"] == pytest.approx(np.mean([metrics["per_target"][t]["r2"] for t in ("first", "total")]))
    meta = json.loads((out / "best" / "config.json").read_text())
    assert meta["target_mean"] == pytest.approx([float(np.mean(v)) for v in (a, a + b)], rel=0.2)
    tags = pd.DataFrame({"text": [f"msg {i} {'red' if i % 2 else ''} {'big' if i % 3 == 0 else ''}" for i in range(90)]})
    tags["red"], tags["big"] = [i % 2 for i in range(90)], [int(i % 3 == 0) for i in range(90)]
    tags["tags"] = ["|".join(n for n in ("red", "big") if row[n]) for _, row in tags.iterrows()]
    tags.to_csv(tmp_path / "tags.csv", index=False)
    labels = {}
    for how in (["data.label_fields=[red,big]"], ["data.label_field=tags", "data.label_separator='|'"]):
        out = tmp_path / how[0].split("=")[0]
        code, _, err = cli(capsys, "run", "multilabel", "--quiet", "--config", "multilabel_tiny", f"output_dir={out}",
                           f"data.path={tmp_path / 'tags.csv'}", "train.epochs=1", *how)
        assert code == 0, err
        labels[how[0]] = json.loads((out / "best" / "config.json").read_text())["labels"]
    assert labels == {"data.label_fields=[red,big]": ["red", "big"], "data.label_field=tags": ["big", "red"]}


def test_predictions_from_logits_match_each_problem_type():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    single = Predictions.from_logits(logits, {"labels": ["a", "b", "c"]})
    assert single.answers()[0]["label"] == "a" and single.values.sum().item() == pytest.approx(1.0)
    multi = Predictions.from_logits(logits, {"labels": ["a", "b", "c"], "problem_type": "multi_label_classification",
                                             "thresholds": [0.5, 0.3, 0.5]})
    assert multi.label_sets() == [["a", "c"]]  # sigmoid(0) = 0.5 reaches its threshold; sigmoid(-1) = 0.27 < 0.3
    numbers = Predictions.from_logits(logits, {"labels": ["a", "b", "c"], "problem_type": "regression",
                                               "target_mean": [1.0, 2.0, 3.0], "target_std": [2.0, 1.0, 0.5]})
    assert numbers.values.tolist() == [[5.0, 1.0, 3.0]]


def test_the_bundled_sms_tags_are_what_their_script_writes():
    import runpy

    from finetune.datasets import SMS_TAGS, bundled

    script = runpy.run_path(str(Path(__file__).parents[2] / "bundled" / "sms-tags" / "make_sms_tags.py"))
    written = "".join(json.dumps(row) + "\n" for row in script["records"]())
    assert bundled(SMS_TAGS).read_text(encoding="utf-8") == written  # bundled() checks the SHA-256 too


def test_thresholds_tuned_on_validation_maximise_each_labels_f1_and_travel_with_the_model(tmp_path):
    out = tmp_path / "tuned"
    assert main(["run", "multilabel", "--quiet", *RUNS["multilabel"], f"output_dir={out}", "train.tune_thresholds=true"]) == 0
    loaded = load_classifier(str(out))
    thresholds = loaded.meta["thresholds"]
    assert thresholds == json.loads((out / "best" / "config.json").read_text())["thresholds"]
    assert thresholds != [0.5] * len(thresholds)
    texts, truth = split_of(out, "multilabel", "val")
    probabilities = predict(loaded.classifier_model, loaded.meta, texts).values.numpy()
    for k, cut in enumerate(thresholds):  # no cut-off does better on validation, label by label
        best = max(f1_score(truth[:, k], probabilities[:, k] >= c, zero_division=0) for c in np.unique(probabilities[:, k]))
        assert f1_score(truth[:, k], probabilities[:, k] >= cut, zero_division=0) == pytest.approx(best, abs=1e-6)
    test_texts, test_truth = split_of(out, "multilabel")
    chosen = predict(loaded.classifier_model, loaded.meta, test_texts).chosen().numpy()
    ours = json.loads((out / "metrics.json").read_text())["test"]
    assert ours["macro_f1"] == pytest.approx(f1_score(test_truth, chosen, average="macro", zero_division=0), abs=1e-12)
    from finetune.checkpoints.atomic import verify

    verify(out / "best")  # rewritten atomically, with its manifest
