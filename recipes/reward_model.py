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

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from pydantic import Field, model_validator

from finetune.recipe_api import (
    REWARD,
    Collate,
    Float,
    Format,
    GPTClassifier,
    Recipe,
    RunConfig,
    Section,
    Setup,
    UserError,
    check_style,
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
from finetune.recipes.dpo import Pair, read_pairs
from finetune.recipes.text_head import ClassifierModel, build_head_model

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


def prompt_style(config: RewardConfig) -> str:
    """The config's style, else the start model's, else alpaca (as GRPO and DPO's starts). A classifier start
    is refused before it is loaded."""
    meta = stored_meta(config.model.name) if config.model.init == "pretrained" else {}
    if meta.get("task") == "classification":
        raise UserError(
            f"model.name: '{config.model.name}' is a classifier; a reward model starts from a language model "
            "(an instruct run, or GPT-2)"
        )
    return check_style(config.data.prompt_style or meta.get("prompt_style") or "alpaca", "data.prompt_style")


# -- data ---------------------------------------------------------------------------------------


def encode_pairs(pairs: list[Pair], meta: dict) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair's prompt + chosen and prompt + rejected, written as `finetune.inference.predict`
    writes a reward model's texts, cut to meta's max_length."""
    texts = [exchanges(meta, [p.record.instruction] * 2, [p.record.input] * 2, [p.chosen, p.rejected]) for p in pairs]
    ids = tokenize([text for pair in texts for text in pair])
    cut = [truncate(row, meta["max_length"], meta["keep"]) for row in ids]
    return list(zip(cut[0::2], cut[1::2], strict=True))


class PairCollate:
    """A batch of pairs as one batch of texts, chosen rows first, right-padded as a classifier's texts are."""

    def __init__(self) -> None:
        self.texts = Collate()

    def __call__(self, batch: list[tuple[list[int], list[int]]]) -> dict:
        rows = [(chosen, 0) for chosen, _ in batch] + [(rejected, 0) for _, rejected in batch]
        out = self.texts(rows)
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
        scores = model(batch["input_ids"], batch["attention_mask"])[:, 0].float()
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
        longest = max(len(ids) for pair in encode_pairs(data["train"], meta | {"max_length": context}) for ids in pair)
        return meta | {"max_length": min(longest, context)}

    def setup(self, config: RewardConfig, data: dict, model, accelerator: Accelerator, quiet: bool) -> Setup:
        meta = self.meta(config, data, model.gpt.config.context_length)
        encoded = {split: encode_pairs(data[split], meta) for split in ("train", "val")}
        return Setup(encoded["train"], encoded["val"], PairCollate(), RewardTask(), meta)

    def evaluate(self, config, data, model, meta, splits, accelerator, reuse) -> dict:
        batch_size = config.train.eval_batch_size or config.train.batch_size
        inputs = {split: (encode_pairs(data[split], meta), PairCollate()) for split in splits if data.get(split)}
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
