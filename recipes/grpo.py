"""Reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath), the step after the
book (rasbt/reasoning-from-scratch, chapters 6 and 7), in TRL's names.

config -> data (prompts from any table: `instruction`, optional `input`, and any other columns, which the
rewards read; split 85/10/5 in file order as the instruct recipe) -> model (the start: an instruct or DPO
run, its prompt style and generation defaults read from it; its LoRA adapter merged in, so a LoRA run
trains a new one) -> train (each step: `group_size` completions per prompt sampled with the KV-cache
generator and their log-probabilities kept, rewards scored and normalised within each group, then
`num_iterations` updates of the clipped surrogate, with a KL penalty to the start when `beta` > 0) ->
evaluate (held-out prompts answered greedily: pass@1 and reward; and sampled: mean reward) -> report
(the test split's replies in responses.jsonl, the reward curves).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from accelerate import Accelerator
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from finetune.datasets import ARITHMETIC, data_file
from finetune.recipe_api import (
    GPT,
    Float,
    Format,
    ModelSection,
    Recipe,
    Record,
    RunConfig,
    Section,
    Setup,
    TrainSection,
    UserError,
    check_single_turn_style,
    eval_loader,
    interface_meta,
    language_model,
    lora_layers,
    merged_model,
    plot_curves,
    read_responses,
    read_table,
    split_records,
    stored_meta,
)
from finetune.recipes.grpo_task import CollatePrompts, GRPOSection, GRPOTask, Prompt, ask
from finetune.recipes.instruct import GenerationSection, response_markdown, test_responses
from finetune.recipes.rewards import Rewards

EVAL_SPLITS = ("val", "test")  # train prompts are what the rollouts saw: their reward is logged every step

# -- config -------------------------------------------------------------------------------------


class PromptData(Section):
    path: str | None = Field(
        None,
        description="JSON list, JSONL, CSV or Parquet file; bundled:NAME for a bundled one; null = the "
        "bundled arithmetic questions",
    )
    format: Format | None = Field(None, description="json, jsonl, csv, tsv or parquet; null = from the extension")
    instruction_field: str = "instruction"
    input_field: str = "input"
    reference_field: str = Field("answer", description="the column the test replies are shown beside, if any")
    train_fraction: Float = Field(0.85, gt=0.0, lt=1.0)
    test_fraction: Float = Field(0.10, gt=0.0, lt=1.0)
    prompt_style: str | None = Field(
        None, description="null = the start model's (an instruct or DPO run stores it), else alpaca"
    )
    packing: bool = Field(
        False,
        description="the policy update reads the step's prompt + completion sequences end to end in rows of up to "
        "the context (positions restart, attention stays within each), not padded to the longest",
    )


class GRPOTrain(TrainSection):
    best_metric: str = Field("reward", description="validation metric that picks the kept model")
    best_mode: Literal["min", "max"] = "max"


class GRPOConfig(RunConfig):
    recipe: Literal["grpo"] = "grpo"
    output_dir: str = "runs/grpo"
    model: ModelSection = ModelSection(name="runs/instruct")
    data: PromptData = PromptData()
    grpo: GRPOSection = GRPOSection()
    generation: GenerationSection | None = Field(
        None, description="how the trained model answers when used; null = the start model's"
    )
    train: GRPOTrain = GRPOTrain()

    @model_validator(mode="after")
    def _fractions(self) -> GRPOConfig:
        if self.data.train_fraction + self.data.test_fraction >= 1.0:
            raise ValueError("data: train_fraction + test_fraction must leave some validation prompts (sum < 1)")
        return self


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """The run's prompts split, its rewards, and how its model is prompted and answers."""

    splits: dict[str, list[Prompt]]
    rewards: Rewards
    style: str
    generation: GenerationSection


def read_prompts(data: PromptData) -> tuple[list[Prompt], list[str]]:
    """Every row with its instruction (required), input (optional) and all its columns."""
    path = data_file(data.path, ARITHMETIC)
    table = read_table(path, data.format, setting="data.path (a JSON list, JSONL, CSV or Parquet file)")
    columns = [str(c) for c in table.frame.columns]
    if data.instruction_field not in columns:
        raise UserError(
            f"{path}: no '{data.instruction_field}' column (it has {', '.join(columns)}); set data.instruction_field"
        )
    prompts = []
    for i, row in enumerate(table.frame.to_dict("records")):
        row = {str(k): (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN: missing
        instruction, given = row.get(data.instruction_field), row.get(data.input_field)
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"{table.where(i)}: empty or missing '{data.instruction_field}'; every prompt needs one")
        reference = row.get(data.reference_field)
        record = Record(
            instruction, given if isinstance(given, str) else "", "" if reference is None else str(reference)
        )
        prompts.append(Prompt(record, row, table.where(i)))
    if not prompts:
        raise UserError(f"{path}: no prompts; GRPO needs a table of instructions")
    return prompts, columns


def start_interface(config: GRPOConfig) -> tuple[str, GenerationSection]:
    """The prompt style and generation defaults: the config's, else the start model's, else alpaca and
    the defaults. A classifier start is refused before it is loaded."""
    meta = stored_meta(config.model.name) if config.model.init == "pretrained" else {}
    if meta.get("task") == "classification":
        raise UserError(
            f"model.name: '{config.model.name}' is a classifier; GRPO trains a language model (start from an "
            "instruct or DPO run)"
        )
    style = config.data.prompt_style or meta.get("prompt_style") or "alpaca"
    stored = {k: v for k, v in (meta.get("generation") or {}).items() if k in GenerationSection.model_fields}
    return check_single_turn_style(style, "data.prompt_style"), config.generation or GenerationSection(**stored)


# -- the recipe ---------------------------------------------------------------------------------


class GRPO(Recipe[GRPOConfig, Prompts]):
    name, Config = "grpo", GRPOConfig
    merge_start = True  # the start's adapter is folded in; a LoRA run trains a new one (and disabling it is the start)
    metric_names = ("reward", "pass@1", "sampled_reward", "completions/mean_length")
    headline_metric = "pass@1"

    def prepare(self, config: GRPOConfig) -> Prompts:
        style, generation = start_interface(config)
        prompts, columns = read_prompts(config.data)
        rewards = Rewards(config.grpo.rewards, columns, style)
        splits = split_records(prompts, config.data.train_fraction, config.data.test_fraction)
        return Prompts(splits, rewards, style, generation)

    def build_model(self, config: GRPOConfig, data: Prompts) -> GPT:
        model = language_model(config)
        return merged_model(model) if lora_layers(model) else model

    def setup(self, config: GRPOConfig, data: Prompts, model, accelerator: Accelerator, quiet: bool) -> Setup:
        asked = {split: ask(data.splits[split], data.style, model, config.grpo) for split in ("train", "val")}
        reference = None
        if config.grpo.beta > 0 and not (lora_layers(model) and not config.lora.train_modules):
            reference = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
            size = sum(p.numel() * p.element_size() for p in reference.parameters())
            if accelerator.is_main_process:
                tqdm.write(
                    f"reference model for the KL penalty: a frozen copy of the start, {size / 2**20:,.1f} MiB",
                    file=sys.stderr,
                )
        if accelerator.is_main_process:
            tqdm.write(
                f"prompts: {len(asked['train']):,} train, {len(asked['val']):,} val; {config.grpo.group_size} "
                f"completions each per step; rewards: {', '.join(data.rewards.names)}",
                file=sys.stderr,
            )
        meta = {
            "max_length": model.config.context_length,
            **interface_meta(data.style, data.generation, config.train.seed),
        }
        task = GRPOTask(config.grpo, data.rewards, reference, config.train.seed, config.data.packing)
        return Setup(asked["train"], asked["val"], CollatePrompts(), task, meta)

    def evaluate(
        self,
        config: GRPOConfig,
        data: Prompts,
        model,
        meta: dict,
        splits: tuple[str, ...],
        accelerator: Accelerator,
        reuse: dict,
    ) -> dict:
        """Greedy pass@1 and reward, and the sampled reward, of the held-out splits asked for, prompted in the
        style the evaluated model stores (`finetune eval` of a run whose start is gone still asks it right)."""
        style = meta.get("prompt_style") or data.style
        task = GRPOTask(config.grpo, data.rewards, None, config.train.seed)
        batch_size = config.train.eval_batch_size or config.train.batch_size
        gpt = accelerator.unwrap_model(model)
        return {
            split: task.evaluate(
                model,
                accelerator.prepare(
                    eval_loader(ask(data.splits[split], style, gpt, config.grpo), batch_size, CollatePrompts())
                ),
                accelerator,
            )
            for split in splits
            if split in EVAL_SPLITS
        }

    def report(
        self, out: Path, config: GRPOConfig, data: Prompts, metrics: dict, history: list[dict], model, quiet: bool
    ) -> tuple[dict, list[str]]:
        """The test split's replies (responses.jsonl, beside the reference column); curves.png."""
        resolved = config.model_copy(
            update={"data": config.data.model_copy(update={"prompt_style": data.style}), "generation": data.generation}
        )
        test_responses(model, [p.record for p in data.splits["test"]], resolved, out, metrics, quiet)
        plot_curves(history, out / "curves.png", metric=["reward", "pass@1"])
        return metrics, ["responses.jsonl", "curves.png"]

    def summary_table(self, metrics: dict) -> str:
        rows = [f"{'':<8}{'pass@1':>8}{'reward':>9}{'sampled':>9}{'length':>8}"]
        for split in EVAL_SPLITS:
            if split in metrics:
                m = metrics[split]
                rows.append(
                    f"{split:<8}{m['pass@1']:>8.1%}{m['reward']:>9.3f}{m['sampled_reward']:>9.3f}"
                    f"{m['completions/mean_length']:>8.1f}"
                )
        return "\n".join(rows)

    def report_body(self, config: GRPOConfig, metrics: dict, out: Path) -> list[str]:
        s = config.grpo
        lines = [
            "## GRPO",
            "",
            f"group_size {s.group_size}, loss_type {s.loss_type}, epsilon {s.epsilon}"
            f"{f'/{s.epsilon_high}' if s.epsilon_high else ''}, beta {s.beta}, num_iterations {s.num_iterations}, "
            f"scale_rewards {s.scale_rewards}, rollout temperature {s.temperature}, max_new_tokens {s.max_new_tokens}.",
            f"Rewards: {', '.join(f'{r.default_name()} x{r.weight:g}' for r in s.rewards)}; a greedy reply passes "
            f"when its total reward reaches {s.pass_reward:g}.",
        ]
        return lines + response_markdown(metrics, read_responses(out / "responses.jsonl"))


RECIPE = GRPO()
