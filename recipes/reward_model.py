"""Reward models: a score for a prompt and its response, learnt from the preference pairs DPO reads.

config -> data (instruction/input with a `chosen` and a `rejected` response, split 85/10/5 in file order
as DPO splits them) -> model (the start, typically an instruct run, with one output on the last real
token; the prompts in the start's prompt style) -> train (the Bradley-Terry loss
-logsigmoid(r_chosen - r_rejected), as TRL's RewardTrainer) -> evaluate (pairwise accuracy, mean margin
and mean rewards on every split) -> report.
A reward model scores replies in `finetune classify --response`, `finetune predict` on a responses.jsonl,
`finetune score --reward-model`, /v1/classify, and as a GRPO reward (`kind: reward_model`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field, model_validator

from finetune.recipe_api import (
    REWARD,
    CachedFeatures,
    Collate,
    CollateFeatures,
    Encoded,
    Examples,
    Float,
    Format,
    GPTClassifier,
    Recipe,
    RunConfig,
    Section,
    Setup,
    UserError,
    cache_splits,
    check_single_turn_style,
    evaluate_splits,
    exchanges,
    lora_layers,
    merged_model,
    plot_curves,
    split_records,
    stored_meta,
    tokenize,
    truncate,
)
from finetune.recipes.preference_pairs import Pair, read_pairs
from finetune.recipes.text_head import ClassifierModel, HeadTrain, build_head_model, head_outputs

SPLITS = ("train", "val", "test")

# -- config -------------------------------------------------------------------------------------


class RewardData(Section):
    path: str | None = Field(
        None, description="JSON list, JSONL, CSV or Parquet file; null = the book's 1,100 preference records"
    )
    format: Format | None = Field(None, description="json, jsonl, csv, tsv or parquet; null = from the extension")
    instruction_field: str = "instruction"
    input_field: str = "input"
    chosen_field: str = Field("chosen", description="the preferred response")
    rejected_field: str = Field("rejected", description="the dispreferred response")
    train_fraction: Float = Field(0.85, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.10, gt=0.0, lt=1.0)  # validation gets the rest, as DPO splits them
    max_length: int | None = Field(
        None, ge=2, description="tokens per prompt and response; null = the longest training one, within the context"
    )
    prompt_style: str | None = Field(
        None, description="null = the start model's (an instruct or DPO run stores it), else alpaca"
    )

    @model_validator(mode="after")
    def _fractions(self) -> RewardData:
        if self.train_fraction + self.test_fraction >= 1.0:
            raise ValueError("train_fraction + test_fraction must leave some validation data (sum < 1)")
        return self


class RewardConfig(RunConfig):
    recipe: Literal["reward"] = "reward"
    output_dir: str = "runs/reward"
    model: ClassifierModel = ClassifierModel(name="runs/instruct")
    data: RewardData = RewardData()
    train: HeadTrain = HeadTrain()


def prompt_style(config: RewardConfig) -> str:
    """The config's style, else the start model's, else alpaca (as GRPO and DPO's starts). A classifier start
    is refused before it is loaded."""
    meta = stored_meta(config.model.name) if config.model.init == "pretrained" else {}
    if meta.get("task") == "classification":
        raise UserError(
            f"model.name: '{config.model.name}' is a classifier; a reward model starts from a language model "
            "(an instruct run, or GPT-2)"
        )
    return check_single_turn_style(
        config.data.prompt_style or meta.get("prompt_style") or "alpaca", "data.prompt_style"
    )


# -- data ---------------------------------------------------------------------------------------


def encode_sides(pairs: list[Pair], meta: dict) -> tuple[Encoded, Encoded]:
    """Token ids of every pair's prompt + chosen and prompt + rejected (as texts a classifier reads, label 0),
    written as `finetune.inference.predict` writes a reward model's texts, cut to meta's max_length."""
    texts = [exchanges(meta, [p.record.instruction] * 2, [p.record.input] * 2, [p.chosen, p.rejected]) for p in pairs]
    ids = tokenize([text for pair in texts for text in pair])
    cut = [truncate(row, meta["max_length"], meta["keep"]) for row in ids]
    return Encoded(cut[0::2], [0] * len(pairs)), Encoded(cut[1::2], [0] * len(pairs))


def paired(chosen: Examples, rejected: Examples) -> list[tuple]:
    """The two sides' items (token ids or cached features, as the texts' collate takes them) side by side."""
    return [(chosen[i], rejected[i]) for i in range(len(chosen))]


class PairCollate:
    """A batch of pairs as one batch of texts, chosen rows first, through the texts' own collate (padded
    token ids, or cached features)."""

    def __init__(self, texts: Callable[[list], dict]) -> None:
        self.texts = texts

    def __call__(self, batch: list[tuple]) -> dict:
        out = self.texts([chosen for chosen, _ in batch] + [rejected for _, rejected in batch])
        out["count"] = len(batch)
        return out


# -- task ---------------------------------------------------------------------------------------


def pair_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per pair: the Bradley-Terry loss -logsigmoid(r_c - r_r), whether chosen scored higher, the margin."""
    margin = chosen - rejected
    return {
        "loss": -F.logsigmoid(margin),
        "accuracy": (margin > 0).to(margin.dtype),
        "margin": margin,
        "reward_chosen": chosen,
        "reward_rejected": rejected,
    }


class RewardTask:
    unit = "pairs"

    def rewards(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores = head_outputs(model, batch)[:, 0].float()
        return scores[: batch["count"]], scores[batch["count"] :]

    def loss(self, model, batch: dict) -> dict[str, torch.Tensor]:
        terms = pair_terms(*self.rewards(model, batch))
        return {name: value.sum() for name, value in terms.items()}

    def count(self, batch: dict) -> int:
        return batch["count"]

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator: Accelerator) -> dict:
        model.eval()
        chosen, rejected = [], []
        for batch in loader:
            with accelerator.autocast():
                pair = self.rewards(model, batch)
            c, r = accelerator.gather_for_metrics(pair)
            chosen.append(c.double().cpu())
            rejected.append(r.double().cpu())
        terms = pair_terms(torch.cat(chosen), torch.cat(rejected))
        return {name: value.mean().item() for name, value in terms.items()} | {"n": len(terms["loss"])}


# -- the recipe ---------------------------------------------------------------------------------


class RewardModel(Recipe[RewardConfig, dict[str, list[Pair]]]):
    name = "reward"
    Config = RewardConfig
    merge_start = True  # the start's LoRA adapter is folded in; a LoRA run here trains a new one
    metric_names = ("accuracy", "margin", "loss", "reward_chosen", "reward_rejected")
    headline_metric = "accuracy"

    def prepare(self, config: RewardConfig) -> dict[str, list[Pair]]:
        prompt_style(config)  # a classifier start or a bad style fails before any model is built
        return split_records(read_pairs(config.data), config.data.train_fraction, config.data.test_fraction)

    def build_model(self, config: RewardConfig, data: dict) -> GPTClassifier:
        model = build_head_model(config.model, ["reward"])
        return merged_model(model) if lora_layers(model) else model

    def meta(self, config: RewardConfig, data: dict, context: int) -> dict:
        meta = {"labels": ["reward"], "problem_type": REWARD, "prompt_style": prompt_style(config), "keep": "start"}
        if config.data.max_length:
            return meta | {"max_length": min(config.data.max_length, context)}
        longest = max(
            len(ids) for side in encode_sides(data["train"], meta | {"max_length": context}) for ids in side.ids
        )
        return meta | {"max_length": min(longest, context)}

    def setup(self, config: RewardConfig, data: dict, model, accelerator: Accelerator, quiet: bool) -> Setup:
        """Both sides of the training and validation pairs as texts; with a frozen trunk (and dropout 0), the
        frozen layers' output for each text computed once (finetune.training.features)."""
        meta = self.meta(config, data, model.gpt.config.context_length)
        sides: dict[str, Examples] = {}
        for split in ("train", "val"):
            sides[f"{split}/chosen"], sides[f"{split}/rejected"] = encode_sides(data[split], meta)
        texts: Callable[[list], dict] = Collate.for_pool(config.model.pool, meta["max_length"])
        cached: dict[str, CachedFeatures] = {}
        if config.train.cache_features:
            batch_size = config.train.eval_batch_size or config.train.batch_size
            cached = cache_splits(model, sides, texts, batch_size, accelerator, quiet)
        if cached:
            sides, texts = dict(cached), CollateFeatures(next(iter(cached.values())).start)
        pairs = {split: paired(sides[f"{split}/chosen"], sides[f"{split}/rejected"]) for split in ("train", "val")}
        reuse = {"cached": cached}
        return Setup(pairs["train"], pairs["val"], PairCollate(texts), RewardTask(), meta, reuse=reuse)

    def evaluate(self, config, data, model, meta, splits, accelerator, reuse) -> dict:
        """Features cached in training serve its splits at the end (the layers below them stay frozen)."""
        cached = reuse.get("cached") or {}
        batch_size = config.train.eval_batch_size or config.train.batch_size
        inputs = {}
        for split in (s for s in splits if data.get(s)):
            if f"{split}/chosen" in cached:
                chosen, rejected = cached[f"{split}/chosen"], cached[f"{split}/rejected"]
                texts: Callable[[list], dict] = CollateFeatures(chosen.start)
            else:
                chosen, rejected = encode_sides(data[split], meta)
                texts = Collate.for_pool(meta["pool"], meta["max_length"])
            inputs[split] = (paired(chosen, rejected), PairCollate(texts))
        return evaluate_splits(RewardTask(), model, inputs, batch_size, accelerator)

    def report(self, out: Path, config, data, metrics: dict, history, model, quiet: bool) -> tuple[dict, list[str]]:
        plot_curves(history, out / "curves.png", metric=self.headline_metric)
        return metrics, ["curves.png"]

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<14}{'accuracy':>10}{'margin':>9}{'chosen':>9}{'rejected':>10}{'loss':>8}{'pairs':>7}"]
        for split in SPLITS:
            if split in metrics:
                m = metrics[split]
                rows.append(
                    f"{split:<14}{m['accuracy']:>10.2%}{m['margin']:>9.3f}{m['reward_chosen']:>9.3f}"
                    f"{m['reward_rejected']:>10.3f}{m['loss']:>8.3f}{m['n']:>7}"
                )
        return "\n".join(rows)


Config = RewardConfig
RECIPE = RewardModel()
