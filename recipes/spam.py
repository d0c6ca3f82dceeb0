"""SMS spam classification: GPT-2 with a classification head (the book's chapter 6).

config -> data (SMS Spam Collection, balanced, stratified 70/10/20) -> model (GPT-2 + 2-way head on
the last real token) -> train (last block + final norm + head by default) -> evaluate (train, val,
test, beside a TF-IDF + logistic regression baseline on the same split).
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field, model_validator
from sklearn.model_selection import train_test_split

from finetune.evals.classification import classification_metrics
from finetune.evals.plots import plot_confusion, plot_curves
from finetune import build_model
from finetune.checkpoint import kept_checkpoint, load_model, read_meta, write_text_atomic
from finetune.checkpoint import resolve as resolve_checkpoint
from finetune.classifier import GPTClassifier
from finetune.config import Float, FinetuneSection, ModelSection, RunConfig, Section, TrainSection, load_config
from finetune.errors import UserError
from finetune.features import CachedFeatures, CollateFeatures, cache_splits
from finetune.data import SMS_SPAM, bundled
from finetune.files import read_text
from finetune.tokenizer import EOT_ID, get_tokenizer
from finetune.trainable import configure_trainable
from finetune.trainer import Trainer, check_output_dir, eval_loader, make_accelerator

LABELS = ("ham", "spam")
SPLITS = ("train", "val", "test")


# -- config -------------------------------------------------------------------------------------


class SpamData(Section):
    path: str | None = Field(None, description="label<TAB>text file; null = the bundled SMS Spam Collection")
    balance: bool = Field(True, description="undersample ham to the number of spam messages, as the book does")
    val_fraction: Float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.2, gt=0.0, lt=1.0)
    max_length: int | None = Field(None, ge=1, description="tokens per message; null = longest training message")

    @model_validator(mode="after")
    def _fractions(self) -> "SpamData":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some training data (sum < 1)")
        return self


class ClassifierModel(ModelSection):
    pool: Literal["last_token", "last_position"] = Field(
        "last_token", description="read the last real token, or the last position as the book does"
    )


class SpamTrain(TrainSection):
    cache_features: bool = Field(
        True, description="compute the frozen layers below the first trainable block once per example, not every "
                          "epoch (only when dropout is 0); costs tokens x n_embd x 4 bytes of memory"
    )


class SpamConfig(RunConfig):
    recipe: Literal["spam"] = "spam"
    output_dir: str = "runs/spam"
    model: ClassifierModel = ClassifierModel()
    data: SpamData = SpamData()
    train: SpamTrain = SpamTrain()
    finetune: FinetuneSection = FinetuneSection(trainable="last_block")


Config = SpamConfig


# -- data ---------------------------------------------------------------------------------------


def read_messages(path: Path) -> list[tuple[int, str]]:
    """(label index, text) per line of a `label<TAB>text` file.

    Lines are split on the first tab only, with no quote handling: the book's pandas call treats
    quotes specially and silently merges rows.
    """
    text = read_text(path, "data file", "data.path (a label<TAB>text file)")
    messages, blank, first_seen, duplicates = [], [], {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank.append(number)
            continue
        label, tab, message = line.partition("\t")
        if not tab:
            raise UserError(f"{path}:{number}: no tab; each line must be label<TAB>text")
        if label not in LABELS:
            raise UserError(f"{path}:{number}: unknown label '{label}'; labels must be one of {', '.join(LABELS)}")
        if not message.strip():
            raise UserError(f"{path}:{number}: empty message after the label")
        messages.append((LABELS.index(label), message))
        if message in first_seen:
            duplicates.append((number, first_seen[message]))
        first_seen.setdefault(message, number)
    if blank:
        warnings.warn(f"{path}: skipped {len(blank)} blank line(s), first at line {blank[0]}", stacklevel=2)
    if duplicates:
        line, original = duplicates[0]
        warnings.warn(f"{path}: {len(duplicates)} duplicate message(s) kept, e.g. line {line} repeats line {original}",
                      stacklevel=2)
    if not messages:
        raise UserError(f"{path}: no messages; expected label<TAB>text lines")
    for index, name in enumerate(LABELS):
        if sum(label == index for label, _ in messages) < 3:
            raise UserError(f"{path}: fewer than 3 '{name}' messages; the stratified split needs more of each label")
    return messages


def data_path(config: SpamData) -> Path:
    return Path(config.path) if config.path is not None else bundled(SMS_SPAM)


def split_messages(messages: list[tuple[int, str]], config: SpamData, seed: int) -> dict[str, list[tuple[int, str]]]:
    """Optional undersampling of the majority class, then a stratified train/val/test split."""
    if config.balance:
        by_label = [[m for m in messages if m[0] == i] for i in range(len(LABELS))]
        smallest = min(len(group) for group in by_label)
        rng = random.Random(seed)
        messages = [m for group in by_label for m in rng.sample(group, smallest)]
    labels = [label for label, _ in messages]
    rest, test = train_test_split(messages, test_size=config.test_fraction, stratify=labels, random_state=seed)
    val_share = config.val_fraction / (1 - config.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=[m[0] for m in rest], random_state=seed)
    return {"train": train, "val": val, "test": test}


@dataclass
class Encoded:
    """Token ids per message, truncated to a fixed maximum."""

    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def by_length(data: Encoded) -> Encoded:
    """The same messages, shortest first, for evaluation: batches of similar lengths carry little
    padding, and metrics do not depend on the order."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    return Encoded([data.ids[i] for i in order], [data.labels[i] for i in order])


def encode(messages: list[tuple[int, str]], max_length: int) -> Encoded:
    tokenizer = get_tokenizer()
    ids = [tokenizer.encode_ordinary(text)[:max_length] for _, text in messages]
    return Encoded(ids, [label for label, _ in messages])


class Collate:
    """Right-pads with <|endoftext|> to the longest message of the batch (or to `pad_to`)."""

    def __init__(self, pad_to: int | None = None) -> None:
        self.pad_to = pad_to

    @classmethod
    def for_pool(cls, pool: str, max_length: int) -> "Collate":
        """The book's last-position pooling needs every message padded to the same length."""
        return cls(max_length if pool == "last_position" else None)

    def __call__(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(ids) for ids, _ in batch)
        return {
            "input_ids": torch.tensor([ids + [EOT_ID] * (width - len(ids)) for ids, _ in batch]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch]),
            "labels": torch.tensor([label for _, label in batch]),
        }


# -- task ---------------------------------------------------------------------------------------


class SpamTask:
    """Cross-entropy over one label per message; metrics from finetune.evals.classification."""

    @staticmethod
    def logits(model, batch: dict) -> torch.Tensor:
        """From token ids, or from cached features (finetune.features)."""
        if "hidden" in batch:
            return model(hidden=batch["hidden"], index=batch["index"], start=batch["start"])
        return model(batch["input_ids"], batch["attention_mask"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"], reduction="sum")

    def count(self, batch: dict) -> int:
        return len(batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict:
        model.eval()
        all_logits, all_labels = [], []
        for batch in loader:
            logits = self.logits(model, batch).float()
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        loss = F.cross_entropy(logits, labels).item()
        return classification_metrics(labels.tolist(), logits.argmax(-1).tolist(), LABELS, loss)


# -- the recipe ---------------------------------------------------------------------------------


def prepare_data(config: SpamConfig) -> dict[str, list[tuple[int, str]]]:
    """Read, check and split the data: cheap, so it runs before the model is built."""
    return split_messages(read_messages(data_path(config.data)), config.data, config.train.seed)


def encode_splits(splits: dict[str, list[tuple[int, str]]], config: SpamConfig, context_length: int) -> tuple[dict[str, Encoded], int]:
    longest = max(len(get_tokenizer().encode_ordinary(text)) for _, text in splits["train"])
    max_length = config.data.max_length or min(longest, context_length)
    if max_length > context_length:
        raise UserError(f"data.max_length={max_length} exceeds the model's context length {context_length}")
    return {name: encode(split, max_length) for name, split in splits.items()}, max_length


def build_classifier(config: SpamConfig) -> GPTClassifier:
    gpt = build_model(config.model.name, config.model.init, config.model.dropout)
    model = GPTClassifier(gpt, num_classes=len(LABELS), pool=config.model.pool)
    return configure_trainable(model, config)


def base_spec(config: SpamConfig) -> dict:
    """How to rebuild the base model under an adapter: its name, or (random init) the seed that made it."""
    return {"name": config.model.name, "init": config.model.init, "seed": config.train.seed}


def run(config: SpamConfig, quiet: bool = False) -> dict:
    check_output_dir(config)
    splits = prepare_data(config)
    accelerator = make_accelerator(config.train)
    torch.manual_seed(config.train.seed)
    model = build_classifier(config)
    data, max_length = encode_splits(splits, config, model.gpt.config.context_length)
    data["val"] = by_length(data["val"])
    collate = Collate.for_pool(config.model.pool, max_length)
    cached = {}
    if config.train.cache_features:
        eval_bs = config.train.eval_batch_size or config.train.batch_size
        cached = cache_splits(model, {"train": data["train"], "val": data["val"]}, collate, eval_bs, accelerator, quiet)
    if cached:
        data.update(cached)
        collate = CollateFeatures(cached["train"].start)
    trainer = Trainer(
        config, accelerator, model, SpamTask(), data["train"], data["val"], collate,
        meta={"labels": list(LABELS), "max_length": max_length, "base": base_spec(config)}, quiet=quiet,
    )
    fit = trainer.fit()  # ends with the kept weights in trainer.model
    return report(Path(config.output_dir), config, accelerator, fit.history, quiet, cached, trainer.model)


def report(out: Path, config: SpamConfig, accelerator: Accelerator, history: list[dict], quiet: bool,
           cached: dict[str, CachedFeatures], model: torch.nn.Module) -> dict:
    """Evaluate the kept model on every split beside the baseline; write metrics.json and plots."""
    metrics = evaluate_run(out, SPLITS, accelerator, cached, model)
    metrics["baseline"] = tfidf_baseline(prepare_data(config))
    if accelerator.is_main_process:
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        plot_curves(history, out / "curves.png", metric="accuracy")
        plot_confusion(metrics["test"]["confusion_matrix"], LABELS, out / "confusion_matrix.png", "Test confusion matrix")
        if not quiet:
            print(summary_table(metrics))
            print(f"results in {out}/metrics.json, curves.png, confusion_matrix.png")
    return metrics


def evaluate_run(out: Path, splits: tuple[str, ...], accelerator: Accelerator | None = None,
                 cached: dict[str, CachedFeatures] | None = None, model: torch.nn.Module | None = None) -> dict:
    """Metrics of a run's kept checkpoint on the given splits; the same numbers as at the end of training.

    At the end of training, `model` is the prepared model already holding the kept weights, and
    `cached` the features computed for some splits (the layers below them are frozen, so they hold
    for the kept weights too); otherwise the checkpoint is loaded."""
    cached = cached or {}
    config = load_config(SpamConfig, out / "config.yaml")
    accelerator = accelerator or make_accelerator(config.train)
    kept = kept_checkpoint(out)
    if model is None:
        model, meta = load_model(kept)
        model = accelerator.prepare(model)
    else:
        meta = read_meta(kept)
    raw = prepare_data(config)
    data = {split: by_length(encode(raw[split], meta["max_length"])) for split in splits}
    results = {}
    for split in splits:
        dataset, collate = data[split], Collate.for_pool(meta["pool"], meta["max_length"])
        if split in cached:
            dataset, collate = cached[split], CollateFeatures(cached[split].start)
        loader = eval_loader(dataset, config.train.eval_batch_size or config.train.batch_size, collate)
        results[split] = SpamTask().evaluate(model, accelerator.prepare(loader), accelerator)
    return results


def tfidf_baseline(splits: dict[str, list[tuple[int, str]]]) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression trained on the same training split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([text for _, text in splits["train"]])
    classifier = LogisticRegression(C=10.0, max_iter=1000).fit(features, [label for label, _ in splits["train"]])
    results = {}
    for name, split in splits.items():
        labels = [label for label, _ in split]
        probs = classifier.predict_proba(vectorizer.transform([text for _, text in split]))
        loss = log_loss(labels, probs, labels=list(range(len(LABELS))))
        results[name] = classification_metrics(labels, probs.argmax(1).tolist(), LABELS, loss)
    return results


def summary_table(metrics: dict) -> str:
    rows = [f"{'':<22}{'accuracy':>10}{'f1':>8}{'loss':>8}"]
    for split in SPLITS:
        if split in metrics:
            m = metrics[split]
            rows.append(f"{'GPT-2 ' + split:<22}{m['accuracy']:>10.2%}{m['f1']:>8.3f}{m['loss']:>8.3f}")
    baseline = metrics.get("baseline", {}).get("test")
    if baseline:
        rows.append(f"{'TF-IDF+LR test':<22}{baseline['accuracy']:>10.2%}{baseline['f1']:>8.3f}{baseline['loss']:>8.3f}")
    return "\n".join(rows)


def classify(directory: Path, texts: list[str]) -> list[tuple[str, float]]:
    """(label, probability) for each text, from a run directory or a checkpoint directory."""
    directory = resolve_checkpoint(directory)
    model, meta = load_model(directory)
    if meta.get("task") != "classification":
        raise UserError(f"{directory}: a {meta.get('task')} checkpoint, not a classifier")
    if not texts or any(not text.strip() for text in texts):
        raise UserError("--text is empty; give a message to classify")
    data = encode([(0, text) for text in texts], meta["max_length"])
    batch = Collate.for_pool(meta["pool"], meta["max_length"])(list(data))
    with torch.no_grad():
        probs = model.eval()(batch["input_ids"], batch["attention_mask"]).softmax(-1)
    labels = meta.get("labels", [str(i) for i in range(probs.shape[1])])
    return [(labels[int(p.argmax())], float(p.max())) for p in probs]

