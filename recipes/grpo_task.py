"""GRPO's task for the one trainer (a `RolloutTask`): the algorithm's settings, rollouts (a group of sampled
completions per prompt, their log-probabilities kept, their rewards scored and normalised within the group),
the clipped-surrogate loss in TRL's formulas and loss types, and evaluation by generation. The recipe
(`grpo.py`) reads the prompts and tells the story around it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from pydantic import Field

from finetune.recipe_api import (
    EOT_ID,
    GPT,
    IGNORE,
    Float,
    Record,
    Section,
    UserError,
    adapters_disabled,
    decode,
    get_tokenizer,
    pack,
    packed_batch,
    prompt_tokens,
    token_logprobs,
)
from finetune.recipes.rewards import Rewards, RewardSpec


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


@dataclass(frozen=True)
class Prompt:
    record: Record  # instruction, input, and the reference column as output (for responses.jsonl)
    columns: dict[str, Any]  # the whole row: what the rewards read
    where: str  # file and row, for errors


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

    def __init__(
        self,
        settings: GRPOSection,
        rewards: Rewards,
        reference: torch.nn.Module | None,
        seed: int,
        packing: bool = False,
    ):
        """`packing`: the policy update reads prompt + completion sequences laid end to end in rows of up to
        the context (finetune.data.packing); the loss sees the same per-token log-probabilities."""
        self.settings, self.rewards, self.seed, self.packing = settings, rewards, seed, packing
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

    def score(self, asked: list[Asked], copies: int, kept: list[list[int]]) -> torch.Tensor:
        """Every reward of every completion `(N, rewards)`; completion i answers prompt i // copies."""
        tokenizer = get_tokenizer()
        texts = [tokenizer.decode([t for t in ids if t != EOT_ID]) for ids in kept]
        prompts = [text for a in asked for text in [tokenizer.decode(a.ids)] * copies]  # each decoded once
        records = [{"columns": a.prompt.columns, "where": a.prompt.where} for a in asked for _ in range(copies)]
        return self.rewards.score(prompts, texts, kept, records)

    def rollout(self, model: torch.nn.Module, micro: list[dict]) -> list[dict]:
        return [self._rollout(model, batch["asked"]) for batch in micro]

    def _rollout(self, model: torch.nn.Module, asked: list[Asked]) -> dict:
        s, G = self.settings, self.settings.group_size
        gpt = model
        if not isinstance(gpt, GPT):  # the trainer hands over the unwrapped model
            raise TypeError(f"GRPO samples from a GPT, got {type(model).__name__}")
        old_logps, kept = self.completions(gpt, asked, G, s.temperature)
        scores = self.score(asked, G, kept)
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
        if self.packing:
            rows = [((p + c)[:-1], t[t != IGNORE].tolist()) for p, c, t in zip(prompts, kept, targets, strict=True)]
            batch["packed"] = {
                k: v.to(device) for k, v in packed_sequences(rows, inputs.shape, gpt.config.context_length).items()
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
            found = self.logps(self.reference, batch)
        else:
            with adapters_disabled(model):
                found = self.logps(model, batch)
        model.train(was_training)
        return found

    # -- the loss -----------------------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The micro-batch's share of the step's loss, as a sum the trainer divides by the step's count,
        and the step's metrics, each scaled by this batch's count so that the division averages them."""
        terms = grpo_loss(
            self.logps(model, batch),
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

    def logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """`(N, T)` log-probability of each completion token (0 elsewhere), from packed rows when packing."""
        temperature = self.settings.temperature
        packed = batch.get("packed")
        if packed is None:
            return token_logprobs(model, batch["input_ids"], batch["targets"], temperature)
        found = token_logprobs(
            model, packed["input_ids"], packed["targets"], temperature, packed["positions"], packed["segments"]
        )
        return torch.where(packed["valid"], found.flatten()[packed["index"]], 0.0)

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
        sums = torch.zeros(len(names), dtype=torch.float64, device=accelerator.device)
        prompts = 0
        for batch in loader:
            asked = batch["asked"]
            with accelerator.autocast():
                _, kept = self.completions(gpt, asked, 1, 0.0)
                _, sampled = self.completions(gpt, asked, G, s.temperature, generator)
            scores = self.score(asked, 1, kept)
            greedy = self.rewards.total(scores)
            sampled_total = self.rewards.total(self.score(asked, G, sampled))
            per_prompt = torch.stack(
                [
                    greedy,
                    (greedy >= s.pass_reward).double(),
                    sampled_total.view(-1, G).mean(dim=1),
                    torch.tensor([len(c) for c in kept], dtype=torch.float64),
                    *scores.T,
                ],
                dim=1,
            ).to(accelerator.device)
            # Every process's prompts, without the repeats accelerate adds to even out the last batch.
            gathered = accelerator.gather_for_metrics(per_prompt)
            sums += gathered.sum(dim=0)
            prompts += len(gathered)
        totals = sums.tolist()
        return {**{n: v / max(prompts, 1) for n, v in zip(names, totals, strict=True)}, "prompts": prompts}


def packed_sequences(rows: list[tuple[list[int], list[int]]], shape: torch.Size, context: int) -> dict:
    """Prompt + completion sequences (inputs, and the completion's targets at the end of them) laid end to end
    in rows of up to `context` tokens, and where each unpacked position `(N, T)` of `shape` is in them:
    `index` into the flattened packed rows, `valid` where a completion token is."""
    lengths = [len(inputs) for inputs, _ in rows]
    packs = pack(lengths, context)
    with_targets = [(inputs, [IGNORE] * (len(inputs) - len(t)) + t) for inputs, t in rows]
    out = packed_batch([[with_targets[i] for i in row] for row in packs])
    width = out["input_ids"].shape[1]
    index = torch.zeros(shape, dtype=torch.long)
    valid = torch.zeros(shape, dtype=torch.bool)
    for r, row in enumerate(packs):
        offset = 0
        for i in row:
            n_targets = len(rows[i][1])
            first = lengths[i] - n_targets  # the completion's targets end the sequence
            index[i, first : lengths[i]] = torch.arange(r * width + offset + first, r * width + offset + lengths[i])
            valid[i, first : lengths[i]] = True
            offset += lengths[i]
    return out | {"index": index, "valid": valid}


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
