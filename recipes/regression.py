"""Regression: predict one or several numbers from a text (a rating, a score, a price).

config -> data (one or several numeric columns; one file split at random by fractions, or separate
files) -> model (GPT-2 + one output per target on the last real token) -> train (MSE or Huber loss on
targets standardised by the training split's mean and standard deviation, which are stored with the
model) -> evaluate (in the targets' units: MAE, RMSE, R², Pearson and Spearman per target, beside the
training mean and a TF-IDF + ridge regression) -> report.
`classify`, `predict`, `serve` and transformers exports answer in the targets' units.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field

from finetune.datasets import ARITHMETIC
from finetune.recipe_api import (
    REGRESSION,
    SPLITS,
    Example,
    Table,
    UserError,
    plot_curves,
    regression_metrics,
)
from finetune.recipes.labelled_data import (
    ONE_FILE,
    LabelledData,
    LabelledFiles,
    label_name,
    random_split,
    source_tables,
)
from finetune.recipes.text_head import (
    TFIDF_TOKENS,
    HeadConfig,
    HeadTrain,
    TextHeadRecipe,
    gathered_outputs,
    head_outputs,
)

# -- config -------------------------------------------------------------------------------------


class RegressionData(LabelledFiles):
    target_fields: list[str] = Field(["label"], min_length=1, description="the column(s) holding the numbers")


class RegressionTrain(HeadTrain):
    loss: Literal["mse", "huber"] = Field(
        "mse", description="mse, or huber (quadratic within 1 standard deviation, linear beyond: robust to outliers)"
    )


class RegressionConfig(HeadConfig):
    recipe: Literal["regression"] = "regression"
    output_dir: str = "runs/regression"
    data: RegressionData = RegressionData()
    train: RegressionTrain = RegressionTrain()


# -- data ---------------------------------------------------------------------------------------


def numeric_rows(table: Table, d: RegressionData) -> list[Example]:
    """(targets, text) per row; a target that is not a finite number names its row."""
    texts = table.column(d.text_field, "data.text_field").tolist()
    columns = [table.column(name, "data.target_fields").tolist() for name in d.target_fields]
    rows: list[Example] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{table.where(i)}: empty text in column '{d.text_field}'")
        rows.append(
            ([_number(values[i], table, i, name) for name, values in zip(d.target_fields, columns, strict=True)], text)
        )
    return rows


def _number(value: object, table: Table, i: int, column: str) -> float:
    if isinstance(value, str):
        value = value.strip()
    if label_name(value) is None:
        raise UserError(f"{table.where(i)}: missing target in column '{column}'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise UserError(f"{table.where(i)}: column '{column}' holds {value!r}, not a number")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{table.where(i)}: column '{column}' holds {value!r}, not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{table.where(i)}: column '{column}' holds {value!r}; targets must be finite numbers")
    return number


def read_numbers(config: RegressionConfig, bundled_file=None) -> LabelledData:
    d = config.data
    tables = source_tables(d, bundled_file)
    examples = {split: numeric_rows(table, d) for split, table in tables.items()}
    if ONE_FILE in examples:
        examples = random_split(examples[ONE_FILE], d, config.train.seed, tables[ONE_FILE].name)
    return LabelledData(examples, list(d.target_fields))


def target_statistics(data: LabelledData, where: str) -> tuple[list[float], list[float]]:
    """Mean and (population) standard deviation of each target over the training split."""
    targets = np.array([values for values, _ in data.splits["train"]], dtype=np.float64)
    mean, std = targets.mean(0), targets.std(0)
    for name, s in zip(data.labels, std, strict=True):
        if s == 0:
            raise UserError(f"{where}: target '{name}' has the same value in every training row; nothing to learn")
    return mean.tolist(), std.tolist()


# -- task ---------------------------------------------------------------------------------------


class RegressionTask:
    """MSE (or Huber) on standardised targets, averaged over texts and targets (transformers' MSELoss);
    metrics in the targets' units."""

    unit = "examples"

    def __init__(self, names: list[str], mean: list[float], std: list[float], loss: str = "mse") -> None:
        self.names, self.kind = names, loss
        self.mean, self.std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)

    def standardised(self, targets: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(targets.device), self.std.to(targets.device)
        return ((targets.double() - mean) / std).float()

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        if self.kind == "huber":
            return F.huber_loss(outputs, self.standardised(targets), reduction=reduction, delta=1.0)
        return F.mse_loss(outputs, self.standardised(targets), reduction=reduction)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self._loss(head_outputs(model, batch).float(), batch["labels"], "sum")

    def count(self, batch: dict) -> float:
        return len(batch["host_labels"]) * len(self.names)

    def evaluate(self, model, loader, accelerator: Accelerator) -> dict:
        outputs, targets = gathered_outputs(model, loader, accelerator)
        targets = targets.double()
        loss = self._loss(outputs, targets, "mean").item()
        predictions = outputs.double() * self.std + self.mean
        return regression_metrics(targets.numpy(), predictions.numpy(), self.names, loss)


# -- the recipe ---------------------------------------------------------------------------------


class Regression(TextHeadRecipe[RegressionConfig]):
    name = "regression"
    Config = RegressionConfig
    problem_type = REGRESSION
    metric_names = ("r2", "mae", "rmse", "pearson", "spearman", "loss")
    headline_metric = "r2"

    def __init__(self, bundled_data=ARITHMETIC) -> None:
        self.bundled = bundled_data

    def read(self, config: RegressionConfig) -> LabelledData:
        return read_numbers(config, self.bundled)

    def outputs_meta(self, config: RegressionConfig, data: LabelledData) -> dict:
        where = config.data.train_path or config.data.path or "the training split"
        mean, std = target_statistics(data, where)
        return {"target_mean": mean, "target_std": std}

    def task(self, config: RegressionConfig, data: LabelledData, meta: dict) -> RegressionTask:
        return RegressionTask(meta["labels"], meta["target_mean"], meta["target_std"], config.train.loss)

    def report(
        self, out: Path, config: RegressionConfig, data: LabelledData, metrics: dict, history, model, quiet: bool
    ) -> tuple[dict, list[str]]:
        metrics["baseline"] = baselines(data)
        plot_curves(history, out / "curves.png", metric=self.headline_metric)
        return metrics, ["curves.png"]

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<24}{'r2':>8}{'mae':>10}{'rmse':>10}{'pearson':>9}{'spearman':>10}"]
        named = [(f"GPT-2 {s}", metrics[s]) for s in SPLITS if s in metrics]
        for kind, results in metrics.get("baseline", {}).items():
            named += [(f"{kind} {s}", results[s]) for s in ("test",) if s in results]
        for name, m in named:
            rows.append(
                f"{name:<24}{m['r2']:>8.3f}{m['mae']:>10.4g}{m['rmse']:>10.4g}{m['pearson']:>9.3f}{m['spearman']:>10.3f}"
            )
        return "\n".join(rows)


def baselines(data: LabelledData) -> dict:
    """The training split's mean for every text, and TF-IDF (1-2 grams of words and punctuation) + ridge
    regression, each fitted on the same training split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, **TFIDF_TOKENS)
    train = np.array([values for values, _ in data.splits["train"]], dtype=np.float64)
    ridge = Ridge(alpha=1.0).fit(vectorizer.fit_transform([text for _, text in data.splits["train"]]), train)
    results: dict[str, dict] = {"mean": {}, "TF-IDF+ridge": {}}
    for name, split in data.splits.items():
        targets = np.array([values for values, _ in split], dtype=np.float64)
        mean = np.broadcast_to(train.mean(0), targets.shape)
        fitted = ridge.predict(vectorizer.transform([text for _, text in split])).reshape(targets.shape)
        results["mean"][name] = regression_metrics(targets, mean, data.labels)
        results["TF-IDF+ridge"][name] = regression_metrics(targets, fitted, data.labels)
    return results


Config = RegressionConfig
RECIPE = Regression()
