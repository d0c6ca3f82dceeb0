"""Rewards for reinforcement learning with verifiable rewards (the GRPO recipe): what a completion earns.

A reward has TRL's reward-function shape, so functions written for TRL's GRPOTrainer carry over:
`reward(prompts=[...], completions=[...], completion_ids=[...], **columns) -> [float, ...]`, one value
per completion, every other column of the prompts' table passed by its name (a reference `answer`,
say). Built in: exact match against a column, the last number in the reply against a column's number,
a regular expression (a format reward) and a length target; your own function by `module:function`
or `path/to/file.py:function`; and a trained finetune classifier (the probability of one label).
A reward that raises, returns the wrong count or a value that is not a finite number stops the run
with one line naming it and the first record of the batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from finetune.recipe_api import REWARD, Float, Section, UserError, load_classifier, predict

RewardFunction = Callable[..., Sequence[Any]]
NEEDS = {
    "exact": ("column",),
    "number": ("column",),
    "regex": ("pattern",),
    "length": ("target",),
    "function": ("function",),
    "classifier": ("model", "label"),
    "reward_model": ("model",),
}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class RewardSpec(Section):
    kind: Literal["exact", "number", "regex", "length", "function", "classifier", "reward_model"] = Field(
        description="exact (match a column), number (the reply's last number equals a column's), regex "
        "(the reply matches a pattern: a format reward), length (near a token count), function (your "
        "own), classifier (a trained finetune classifier's probability of a label), reward_model (a "
        "finetune reward model's score of the prompt and the reply)"
    )
    weight: Float = Field(1.0, description="its share of the total reward (0 = logged only)")
    name: str | None = Field(None, description="how the logs name it; null = from its kind (and column)")
    column: str | None = Field(None, description="exact, number: the column holding the reference")
    pattern: str | None = Field(None, description="regex: searched in the reply; anchor it with ^ and $")
    target: int | None = Field(None, ge=1, description="length: the wanted reply length in tokens")
    function: str | None = Field(None, description="function: module:function or path/to/file.py:function")
    model: str | None = Field(
        None, description="classifier, reward_model: a classification or reward run, checkpoint or export"
    )
    label: str | None = Field(None, description="classifier: the label whose probability is the reward")

    @model_validator(mode="after")
    def _complete(self) -> RewardSpec:
        missing = [key for key in NEEDS[self.kind] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"a '{self.kind}' reward needs {' and '.join(missing)}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression ({e})") from None
        return self

    def default_name(self) -> str:
        if self.name:
            return self.name
        if self.kind in ("exact", "number"):
            return f"{self.kind}_{self.column}"
        if self.kind == "function":
            return str(self.function).rpartition(":")[2]
        return self.kind


@dataclass
class Reward:
    name: str
    weight: float
    function: RewardFunction


class Rewards:
    """The weighted rewards of a run, checked against its prompts' columns before any model is built."""

    def __init__(self, specs: list[RewardSpec], columns: list[str], style: str) -> None:
        """`style`: the prompts' (a reward model must read prompts in it)."""
        if not specs:
            raise UserError("grpo.rewards is empty; list at least one reward (see docs/recipes/grpo.md)")
        if sum(spec.weight for spec in specs) == 0:
            raise UserError("grpo.rewards: the weights sum to 0, so every completion would earn the same")
        names = [spec.default_name() for spec in specs]
        self.rewards = [
            Reward(_unique(name, names[:i]), spec.weight, _function(spec, columns, style))
            for i, (spec, name) in enumerate(zip(specs, names, strict=True))
        ]
        self.names = [reward.name for reward in self.rewards]
        self.weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float64)

    def score(
        self, prompts: list[str], completions: list[str], completion_ids: list[list[int]], records: list[dict]
    ) -> torch.Tensor:
        """`(completions, rewards)` float64: every reward of every completion; `records[i]` is the table row
        completion i answers (its `where` names it in errors)."""
        columns = {key: [r["columns"][key] for r in records] for key in records[0]["columns"]}
        found = torch.empty(len(completions), len(self.rewards), dtype=torch.float64)
        for j, reward in enumerate(self.rewards):
            try:
                values = list(
                    reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
                )
            except UserError:
                raise
            except Exception as e:
                raise UserError(
                    f"reward '{reward.name}' raised {type(e).__name__}: {e} (batch from {records[0]['where']}); "
                    "the last checkpoint is intact"
                ) from e
            if len(values) != len(completions):
                raise UserError(
                    f"reward '{reward.name}' returned {len(values)} values for {len(completions)} completions "
                    f"(batch from {records[0]['where']}); return one float per completion"
                )
            for i, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise UserError(
                        f"reward '{reward.name}' gave {value!r} for {records[i]['where']}; every reward must be "
                        "a finite number (the last checkpoint is intact)"
                    )
            found[:, j] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return found

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each completion's rewards."""
        return scores @ self.weights


def _unique(name: str, before: list[str]) -> str:
    return name if name not in before else f"{name}_{before.count(name) + 1}"


def _function(spec: RewardSpec, columns: list[str], style: str) -> RewardFunction:
    if spec.kind in ("exact", "number") and spec.column not in columns:
        raise UserError(
            f"grpo.rewards: the '{spec.kind}' reward reads column '{spec.column}', which the prompts do not have "
            f"(they have {', '.join(columns)}); set its column or add it to data.path"
        )
    if spec.kind == "exact":
        return _exact(str(spec.column))
    if spec.kind == "number":
        return _number(str(spec.column))
    if spec.kind == "regex":
        return _regex(str(spec.pattern))
    if spec.kind == "length":
        return _length(int(spec.target or 1))
    if spec.kind == "function":
        return import_function(str(spec.function))
    if spec.kind == "reward_model":
        return _reward_model(str(spec.model), style)
    return _classifier(str(spec.model), str(spec.label))


def normalise(text: str) -> str:
    """Lower case, one space between words, no surrounding space or final full stop."""
    return " ".join(str(text).lower().split()).rstrip(".!").strip()


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(str(text))
    return float(found[-1].replace(",", "")) if found else None


def _exact(column: str) -> RewardFunction:
    def exact(completions: list[str], **columns: list) -> list[float]:
        return [float(normalise(c) == normalise(a)) for c, a in zip(completions, columns[column], strict=True)]

    return exact


def _number(column: str) -> RewardFunction:
    def number(completions: list[str], **columns: list) -> list[float]:
        wanted = [last_number(a) for a in columns[column]]
        return [float(w is not None and last_number(c) == w) for c, w in zip(completions, wanted, strict=True)]

    return number


def _regex(pattern: str) -> RewardFunction:
    compiled = re.compile(pattern, re.DOTALL)

    def regex(completions: list[str], **_: list) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]

    return regex


def _length(target: int) -> RewardFunction:
    def length(completion_ids: list[list[int]], **_: list) -> list[float]:
        return [max(0.0, 1.0 - abs(len(ids) - target) / target) for ids in completion_ids]

    return length


def _classifier(model: str, label: str) -> RewardFunction:
    loaded = load_classifier(model)
    if loaded.interface.problem_type == REWARD:
        raise UserError(f"grpo.rewards: {model} is a reward model, which scores the prompt too; use kind: reward_model")
    labels = loaded.meta["labels"]
    if label not in labels:
        raise UserError(f"grpo.rewards: classifier {model} has no label '{label}' (its labels: {', '.join(labels)})")
    index = labels.index(label)

    def classifier(completions: list[str], **_: list) -> list[float]:
        texts = [c if c.strip() else " " for c in completions]  # an empty reply is still scored
        return predict(loaded.classifier_model, loaded.meta, texts).values[:, index].tolist()

    return classifier


def _reward_model(model: str, style: str) -> RewardFunction:
    loaded = load_classifier(model)
    if loaded.interface.problem_type != REWARD:
        raise UserError(
            f"grpo.rewards: {model} is a {loaded.interface.problem_type} model, not a reward model (kind: classifier "
            "rewards a label's probability)"
        )
    if loaded.interface.prompt_style != style:
        raise UserError(
            f"grpo.rewards: the reward model {model} reads prompts in the '{loaded.interface.prompt_style}' style "
            f"and this run asks in '{style}'; set data.prompt_style to its style (or train it on this one)"
        )

    def reward_model(prompts: list[str], completions: list[str], **_: list) -> list[float]:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        return predict(loaded.classifier_model, loaded.meta, texts).values[:, 0].tolist()

    return reward_model


def import_function(spec: str) -> RewardFunction:
    """`module:function` (importable) or `path/to/file.py:function` (loaded from the file)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"grpo.rewards: function '{spec}' must read module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"grpo.rewards: function '{spec}': no file {path}")
            module_name = f"finetune_reward_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise UserError(f"grpo.rewards: function '{spec}': {path} is not a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"grpo.rewards: cannot import '{where}' for function '{spec}' ({type(e).__name__}: {e})") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"grpo.rewards: '{where}' has no function '{name}'")
    return function
