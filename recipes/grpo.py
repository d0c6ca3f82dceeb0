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
from typing import Any, Literal

import torch
from accelerate import Accelerator
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from finetune.datasets import ARITHMETIC, data_file
from finetune.recipe_api import (
    EOT_ID,
    GPT,
    IGNORE,
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
    adapters_disabled,
    check_style,
    decode,
    eval_loader,
    get_tokenizer,
    interface_meta,
    language_model,
    lora_layers,
    merged_model,
    plot_curves,
    prompt_tokens,
    read_responses,
    read_table,
    split_records,
    stored_meta,
    token_logprobs,
)
from finetune.recipes.instruct import GenerationSection, response_markdown, test_responses
from finetune.recipes.rewards import Rewards, RewardSpec

SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")  # train prompts are what the rollouts saw: their reward is logged every step
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")

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


class GRPOSection(Section):
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (TRL's num_generations)")
    rewards: list[RewardSpec] = Field(
        [RewardSpec(kind="number", column="answer")], description="weighted rewards (docs/recipes/grpo.md)"
    )
    max_new_tokens: int = Field(64, ge=1, description="completion length (TRL's max_completion_length)")
    temperature: Float = Field(1.0, gt=0.0, description="of the rollouts; the policy's log-probabilities use it too")
    top_k: int | None = Field(None, ge=1)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    epsilon: Float = Field(0.2, gt=0.0, lt=1.0, description="the ratio is clipped to [1 - epsilon, 1 + epsilon]")
    epsilon_high: Float | None = Field(None, gt=0.0, description="DAPO's upper clip; null = epsilon")
    beta: Float = Field(0.0, ge=0.0, description="KL penalty to the start (k3 estimator); 0 = none, as TRL")
    num_iterations: int = Field(1, ge=1, description="policy updates per batch of rollouts (the paper's mu)")
    scale_rewards: bool = Field(True, description="divide advantages by the group's std; false = Dr. GRPO")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "dapo",
        description="grpo: per completion, then mean; bnpo: per token of each batch; dapo: per token of the "
        "step (TRL's default); dr_grpo: summed, divided by completions x max_new_tokens",
    )
    pass_reward: Float = Field(1.0, description="a greedy reply whose total reward reaches this passes (pass@1)")


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


@dataclass(frozen=True)
class Prompt:
    record: Record  # instruction, input, and the reference column as output (for responses.jsonl)
    columns: dict[str, Any]  # the whole row: what the rewards read
    where: str  # file and row, for errors


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
    return check_style(style, "data.prompt_style"), config.generation or GenerationSection(**stored)


# -- rollouts and the loss -------------------------------------------------------------------------


@dataclass
class Asked:
    """A prompt as the model sees it."""

    prompt: Prompt
    ids: list[int]


class CollatePrompts:
    def __call__(self, batch: list[Asked]) -> dict:
        return {"asked": batch}


class GRPOTask:
    """GRPO as a `RolloutTask`: `rollout` samples and scores a step's groups, `loss` is the clipped
    surrogate (TRL's formulas), `evaluate` answers held-out prompts."""

    def __init__(self, settings: GRPOSection, rewards: Rewards, reference: torch.nn.Module | None, seed: int):
        self.settings, self.rewards, self.seed = settings, rewards, seed
        self.reference = reference  # a frozen copy of the start (full training with beta > 0), or None
        self.updates_per_batch = settings.num_iterations
        self.unit = {"grpo": "completions", "dr_grpo": "completions", "bnpo": "batches", "dapo": "tokens"}[
            settings.loss_type
        ]

    # -- sampling -----------------------------------------------------------------------------------

    def completions(
        self, model: GPT, asked: list[Asked], copies: int, temperature: float, generator=None
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """`copies` completions of each prompt (global random state unless `generator`): the sampled
        tokens' log-probabilities `(N, n)`, and each completion's ids up to and including its end-of-text
        (all n when it ran out of room)."""
        s = self.settings
        ids = [a.ids for a in asked for _ in range(copies)]
        decoded = decode(model, ids, s.max_new_tokens, temperature, s.top_k, s.top_p, EOT_ID, generator)
        n = decoded.logprobs.shape[1]
        tokens = decoded.tokens[:, decoded.tokens.shape[1] - n :].tolist()
        return decoded.logprobs, [row[: row.index(EOT_ID) + 1] if EOT_ID in row else row for row in tokens]

    def score(self, asked: list[Asked], copies: int, kept: list[list[int]]) -> tuple[torch.Tensor, list[str]]:
        """Every reward of every completion `(N, rewards)`, and the completions' texts."""
        tokenizer = get_tokenizer()
        texts = [tokenizer.decode([t for t in ids if t != EOT_ID]) for ids in kept]
        owners = [a for a in asked for _ in range(copies)]
        prompts = [tokenizer.decode(a.ids) for a in owners]
        records = [{"columns": a.prompt.columns, "where": a.prompt.where} for a in owners]
        return self.rewards.score(prompts, texts, kept, records), texts

    def rollout(self, model: torch.nn.Module, micro: list[dict]) -> list[dict]:
        return [self._rollout(model, batch["asked"]) for batch in micro]

    def _rollout(self, model: torch.nn.Module, asked: list[Asked]) -> dict:
        s, G = self.settings, self.settings.group_size
        gpt = model
        if not isinstance(gpt, GPT):  # the trainer hands over the unwrapped model
            raise TypeError(f"GRPO samples from a GPT, got {type(model).__name__}")
        old_logps, kept = self.completions(gpt, asked, G, s.temperature)
        scores, _ = self.score(asked, G, kept)
        total = self.rewards.total(scores)
        grouped = total.view(-1, G)
        std = grouped.std(dim=1)
        advantages = (total - grouped.mean(dim=1).repeat_interleave(G)).float()
        if s.scale_rewards:
            advantages = advantages / (std.repeat_interleave(G).float() + 1e-4)

        device = next(gpt.parameters()).device
        prompts = [a.ids for a in asked for _ in range(G)]
        width = max(len(p) + len(c) for p, c in zip(prompts, kept, strict=True)) - 1
        inputs = torch.full((len(kept), width), EOT_ID, dtype=torch.long)
        targets = torch.full((len(kept), width), IGNORE, dtype=torch.long)
        old = torch.zeros(len(kept), width)
        for i, (p, c) in enumerate(zip(prompts, kept, strict=True)):
            row = (p + c)[:-1]
            inputs[i, : len(row)] = torch.tensor(row)
            targets[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(c)
            old[i, len(p) - 1 : len(p) - 1 + len(c)] = old_logps[i, : len(c)].float().cpu()
        batch = {
            "input_ids": inputs.to(device),
            "targets": targets.to(device),
            "old_logps": old.to(device),
            "advantages": advantages.to(device),
        }
        if s.beta > 0:
            batch["ref_logps"] = self._reference_logps(gpt, batch)
        lengths = [len(c) for c in kept]
        clipped = [not c or c[-1] != EOT_ID for c in kept]
        metrics = {
            "reward": float(total.mean()),
            "reward_std": float(std.mean()),
            "frac_reward_zero_std": float((std < 1e-6).double().mean()),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/clipped_ratio": sum(clipped) / len(clipped),
            **{f"rewards/{name}/mean": float(scores[:, j].mean()) for j, name in enumerate(self.rewards.names)},
        }
        count = {"grpo": len(kept), "dr_grpo": len(kept), "bnpo": 1, "dapo": sum(lengths)}[s.loss_type]
        return {**batch, "count": count, "metrics": metrics}

    def _reference_logps(self, model: GPT, batch: dict) -> torch.Tensor:
        """The start model's log-probabilities of the completions: the policy with its adapters off (LoRA),
        or the frozen copy kept for full training."""
        was_training = model.training
        model.eval()
        if self.reference is not None:
            found = token_logprobs(self.reference, batch["input_ids"], batch["targets"], self.settings.temperature)
        else:
            with adapters_disabled(model):
                found = token_logprobs(model, batch["input_ids"], batch["targets"], self.settings.temperature)
        model.train(was_training)
        return found

    # -- the loss -----------------------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The micro-batch's share of the step's loss, as a sum the trainer divides by the step's count,
        and the step's metrics, each scaled by this batch's count so that the division averages them."""
        terms = grpo_loss(
            token_logprobs(model, batch["input_ids"], batch["targets"], self.settings.temperature),
            batch["targets"] != IGNORE,
            batch["advantages"],
            batch["old_logps"] if self.settings.num_iterations > 1 else None,
            batch.get("ref_logps"),
            self.settings,
        )
        count = float(batch["count"])
        out = {"loss": terms["loss"] * count, "clip_ratio": terms["clip_ratio"] * count}
        if "kl" in terms:
            out["kl"] = terms["kl"] * count
        device = out["loss"].device
        for name, value in batch["metrics"].items():
            out[name] = torch.tensor(value * count, dtype=torch.float64, device=device)
        return out

    def count(self, batch: dict) -> int:
        return batch["count"]

    # -- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader, accelerator: Accelerator) -> dict:
        """Held-out prompts answered greedily (pass@1, reward, each reward's mean, length) and sampled
        `group_size` times (sampled_reward), with a generator of its own: every evaluation samples alike
        and the training's random state is untouched."""
        gpt = accelerator.unwrap_model(model)
        s, G = self.settings, self.settings.group_size
        generator = torch.Generator(device=next(gpt.parameters()).device).manual_seed(self.seed)
        names = ["reward", "pass@1", "sampled_reward", "completions/mean_length"]
        names += [f"rewards/{n}/mean" for n in self.rewards.names]
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)
        for batch in loader:
            asked = batch["asked"]
            with accelerator.autocast():
                _, kept = self.completions(gpt, asked, 1, 0.0)
                _, sampled = self.completions(gpt, asked, G, s.temperature, generator)
            scores, _ = self.score(asked, 1, kept)
            greedy = self.rewards.total(scores)
            sampled_total = self.rewards.total(self.score(asked, G, sampled)[0])
            sums += torch.tensor(
                [
                    greedy.sum(),
                    (greedy >= s.pass_reward).double().sum(),
                    sampled_total.view(-1, G).mean(dim=1).sum(),
                    sum(len(c) for c in kept),
                    *scores.sum(dim=0).tolist(),
                    len(asked),
                ],
                dtype=torch.float64,
            )
        totals = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
        prompts = totals[-1]
        return {**{n: v / prompts for n, v in zip(names, totals[:-1], strict=True)}, "prompts": int(prompts)}


def grpo_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    settings: GRPOSection,
) -> dict[str, torch.Tensor]:
    """TRL's GRPO loss of one batch from `(N, T)` per-token log-probabilities of the policy (and of the policy
    that sampled, None = this one, detached: the ratio is 1; and of the reference when beta > 0), the
    completion `mask` and `(N,)` advantages: `loss` (this batch's value for the loss type, times nothing),
    `clip_ratio` (the share of tokens where the clip is active) and `kl` (mean per token)."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    low, high = 1 - settings.epsilon, 1 + (settings.epsilon_high or settings.epsilon)
    A = advantages[:, None]
    per_token = -torch.min(ratio * A, ratio.clamp(low, high) * A)
    out = {}
    if settings.beta > 0:
        assert ref_logps is not None
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + settings.beta * kl
        out["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    tokens = mask.sum().clamp(min=1)
    if settings.loss_type == "grpo":
        out["loss"] = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / len(mask)
    elif settings.loss_type == "dr_grpo":
        out["loss"] = (per_token * mask).sum() / (len(mask) * settings.max_new_tokens)
    else:  # bnpo and dapo: per token (dapo over the whole step, by the trainer's division)
        out["loss"] = (per_token * mask).sum() / tokens
    clipped = ((ratio < low) & (A < 0)) | ((ratio > high) & (A > 0))
    out["clip_ratio"] = (clipped.to(mask.dtype) * mask).sum() / tokens
    return out


# -- the recipe ---------------------------------------------------------------------------------


class GRPO(Recipe[GRPOConfig, Prompts]):
    name, Config = "grpo", GRPOConfig
    merge_start = True  # the start's adapter is folded in; a LoRA run trains a new one (and disabling it is the start)
    metric_names = ("reward", "pass@1", "sampled_reward", "completions/mean_length")
    headline_metric = "pass@1"

    def prepare(self, config: GRPOConfig) -> Prompts:
        style, generation = start_interface(config)
        prompts, columns = read_prompts(config.data)
        rewards = Rewards(config.grpo.rewards, columns)
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
                tqdm.write(f"reference model for the KL penalty: a frozen copy of the start, {size / 2**20:,.1f} MiB")
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
        task = GRPOTask(config.grpo, data.rewards, reference, config.train.seed)
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
        """Greedy pass@1 and reward, and the sampled reward, of the held-out splits asked for."""
        task = GRPOTask(config.grpo, data.rewards, None, config.train.seed)
        batch_size = config.train.eval_batch_size or config.train.batch_size
        gpt = accelerator.unwrap_model(model)
        return {
            split: task.evaluate(
                model,
                accelerator.prepare(
                    eval_loader(ask(data.splits[split], data.style, gpt, config.grpo), batch_size, CollatePrompts())
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


def ask(prompts: list[Prompt], style: str, model: GPT, settings: GRPOSection) -> list[Asked]:
    """Each prompt's tokens in `style`; a prompt that leaves no room for `max_new_tokens` is refused."""
    context = model.config.context_length
    asked = []
    for p in prompts:
        ids = prompt_tokens(p.record, style)
        if len(ids) + settings.max_new_tokens > context:
            raise UserError(
                f"{p.where}: the prompt is {len(ids)} tokens, leaving no room for grpo.max_new_tokens="
                f"{settings.max_new_tokens} in the context of {context}; shorten it or lower grpo.max_new_tokens"
            )
        asked.append(Asked(p, ids))
    return asked
