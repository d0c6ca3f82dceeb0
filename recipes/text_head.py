"""What every recipe that trains a head on labelled texts shares - one class (classification), a set of
labels (multi-label) or numbers (regression): the classifier built on GPT-2, texts cut to one length,
frozen-trunk features cached once, evaluation of every split, and the checkpoint entries that tell
`classify`, `predict` and `serve` how to read the head's outputs.

A recipe on top says how its data is read (`read`), what its outputs mean (`outputs_meta`) and how it
learns and is measured (`task`); this module runs the rest of the story the same way for all three.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import torch
from accelerate import Accelerator
from pydantic import Field

from finetune.recipe_api import (
    SPLITS,
    CachedFeatures,
    Collate,
    CollateFeatures,
    Encoded,
    Examples,
    GPTClassifier,
    ModelSection,
    Recipe,
    RunConfig,
    Setup,
    Task,
    TrainSection,
    UserError,
    build_model,
    by_length,
    cache_splits,
    evaluate_splits,
    tokenize,
    truncate,
)
from finetune.recipe_api import (
    encode_examples as encode,
)
from finetune.recipes.labelled_data import LabelledData, LabelledFiles

# The baselines' tokens: words, numbers and every punctuation mark, in their case (scikit-learn's default
# drops one-character tokens, punctuation and case, which are what "What is 3 + 4?" or "FREE!!" are made of).
TFIDF_TOKENS = {"token_pattern": r"(?u)\b\w+\b|[^\w\s]", "lowercase": False}


class ClassifierModel(ModelSection):
    pool: Literal["last_token", "last_position"] = Field(
        "last_token", description="read the last real token, or the last position as the book does"
    )


class HeadTrain(TrainSection):
    cache_features: bool = Field(
        True,
        description="compute the frozen layers below the first trainable block once per example, not every "
        "epoch (only when dropout is 0); costs tokens x n_embd x 4 bytes of memory",
    )


class HeadConfig(RunConfig):
    model: ClassifierModel = ClassifierModel()
    data: LabelledFiles
    train: HeadTrain = HeadTrain()


C = TypeVar("C", bound=HeadConfig)


class TextHeadRecipe(Recipe[C, LabelledData], Generic[C]):
    """A head of `len(data.labels)` outputs on GPT-2's last real token. `problem_type` is stored with the
    model (transformers' names), so everything that uses it reads its outputs the right way."""

    problem_type: str

    @abstractmethod
    def read(self, config: C) -> LabelledData:
        """Every split, checked row by row."""

    @abstractmethod
    def outputs_meta(self, config: C, data: LabelledData) -> dict:
        """What reading the outputs needs beyond the labels (thresholds, the targets' statistics)."""

    @abstractmethod
    def task(self, config: C, data: LabelledData, meta: dict) -> Task:
        """The loss and the metrics, for a model whose checkpoint records `meta`."""

    def prepare(self, config: C) -> LabelledData:
        data = self.read(config)
        self.outputs_meta(config, data)  # fails on data it cannot read outputs for, before a model is built
        return data

    def build_model(self, config: C, data: LabelledData) -> GPTClassifier:
        return build_head_model(config.model, data.labels)

    def setup(
        self, config: C, data: LabelledData, model: GPTClassifier, accelerator: Accelerator, quiet: bool
    ) -> Setup:
        encoded, max_length = encode_splits(data, config, model.gpt.config.context_length, ("train", "val"))
        encoded["val"] = by_length(encoded["val"])
        collate: Callable[[list], dict] = Collate.for_pool(config.model.pool, max_length)
        cached: dict[str, CachedFeatures] = {}
        if config.train.cache_features:
            eval_bs = config.train.eval_batch_size or config.train.batch_size
            cached = cache_splits(model, encoded, collate, eval_bs, accelerator, quiet)
        datasets: dict[str, Examples] = dict(encoded)
        if cached:
            datasets.update(cached)
            collate = CollateFeatures(cached["train"].start)
        meta = {
            "labels": data.labels,
            "problem_type": self.problem_type,
            **self.outputs_meta(config, data),
            "max_length": max_length,
            "keep": config.data.keep,
            "text_field": config.data.text_field,
        }
        task = self.task(config, data, meta)
        return Setup(datasets["train"], datasets["val"], collate, task, meta, reuse={"cached": cached})

    def evaluate(
        self,
        config: C,
        data: LabelledData,
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        batch_size = config.train.eval_batch_size or config.train.batch_size
        inputs = split_inputs(data, meta, splits, reuse)
        return evaluate_splits(self.task(config, data, meta), model, inputs, batch_size, accelerator)


def head_outputs(model, batch: dict) -> torch.Tensor:
    """The head's outputs `(texts, outputs)` from token ids, or from cached features (finetune.training.features)."""
    if "hidden" in batch:
        return model(hidden=batch["hidden"], index=batch["index"], start=batch["start"])
    return model(batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def gathered_outputs(model, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's float outputs and the labels of every text of `loader`, from every process, on the CPU."""
    model.eval()
    outputs, labels = [], []
    for batch in loader:
        out, label = accelerator.gather_for_metrics((head_outputs(model, batch).float(), batch["labels"]))
        outputs.append(out.cpu())
        labels.append(label.cpu())
    return torch.cat(outputs), torch.cat(labels)


def split_inputs(
    data: LabelledData, meta: dict, splits: tuple[str, ...], reuse: dict
) -> dict[str, tuple[Examples, Callable[[list], dict]]]:
    """Each split's examples and collate for evaluation. At the end of training, `reuse["cached"]` holds the
    features computed for some splits (the layers below them are frozen, so they hold for the kept weights
    too)."""
    cached = reuse.get("cached") or {}
    inputs: dict[str, tuple[Examples, Callable[[list], dict]]] = {}
    for split in (s for s in splits if s in data.splits):
        if split in cached:
            inputs[split] = cached[split], CollateFeatures(cached[split].start)
        else:
            inputs[split] = (
                by_length(encode(data.splits[split], meta["max_length"], meta.get("keep", "start"))),
                Collate.for_pool(meta["pool"], meta["max_length"]),
            )
    return inputs


def build_head_model(section: ClassifierModel, outputs: list[str]) -> GPTClassifier:
    """`model.name` with a head of one output per name (a new one on a language model; a classifier's own,
    to go on training, when the counts agree)."""
    model = build_model(section.name, section.init, section.dropout)
    if not isinstance(model, GPTClassifier):
        return GPTClassifier(model, num_classes=len(outputs), pool=section.pool)
    if model.num_classes != len(outputs):  # a classifier to go on training (exported, or a PEFT adapter)
        raise UserError(
            f"model.name: '{section.name}' is a classifier of {model.num_classes} outputs, "
            f"but the data has {len(outputs)} ({', '.join(outputs)})"
        )
    model.pool = section.pool
    return model


def encode_splits(
    data: LabelledData, config: HeadConfig, context: int, splits: tuple[str, ...] = SPLITS
) -> tuple[dict[str, Encoded], int]:
    """Token ids of `splits` (train among them), cut to data.max_length: by default the longest
    training text, within the model's context."""
    ids = {s: tokenize([text for _, text in data.splits[s]]) for s in splits if s in data.splits}
    max_length = config.data.max_length or min(max(map(len, ids["train"])), context)
    if max_length > context:
        raise UserError(f"data.max_length={max_length} exceeds the model's context length {context}")
    encoded = {
        s: Encoded(
            [truncate(row, max_length, config.data.keep) for row in rows], [label for label, _ in data.splits[s]]
        )
        for s, rows in ids.items()
    }
    return encoded, max_length
