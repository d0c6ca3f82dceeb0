"""One typed config tree for every recipe: YAML files plus dotted `key=value` overrides.

Sections are pydantic models that forbid unknown keys and check types and ranges, so a mistake is
reported as one line naming the key, and the file and line it came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from finetune.errors import UserError


def _float(value: Any) -> Any:
    # PyYAML reads `5e-5` (no dot) as a string; accept numeric strings, never booleans.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_float)]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules read `no`, `off` and `yes` as booleans,
    so `mixed_precision: no` would be refused as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelSection(Section):
    name: str = Field("gpt2", description="preset, hub id, checkpoint directory or book .pth")
    init: Literal["pretrained", "random", "book"] = Field(
        "pretrained", description="random: GPT-2's init; book: the book's GPTModel init (PyTorch defaults, untied head)"
    )
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)


class SamplingSection(Section):
    """How the language-model recipes generate: greedy by default, or sampled."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: Float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)


class TrainSection(Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="default: batch_size")
    grad_accum_steps: int = Field(1, ge=1)
    lr: Float = Field(5e-5, gt=0.0)
    weight_decay: Float = Field(0.1, ge=0.0)
    max_grad_norm: Float | None = Field(None, gt=0.0, description="clip gradients to this norm; null = off")
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warmup before the schedule")
    min_lr_ratio: Float = Field(0.1, ge=0.0, le=1.0, description="cosine decays to lr * min_lr_ratio")
    seed: int = 123
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None, description="null: as accelerate was launched (--mixed_precision, accelerate config); fp32 otherwise"
    )
    tf32: bool = Field(True, description="TF32 matmuls for fp32 work on GPUs that have them (Ampere and later)")
    activation_checkpointing: bool = Field(
        False,
        description="keep only each block's input and recompute the block in the backward pass: less memory "
        "for about a third more compute; gradients unchanged",
    )
    eval_every: int = Field(0, ge=0, description="evaluate every N optimizer steps; 0 = at epoch ends only")
    eval_at_start: bool = Field(False, description="evaluate the untrained model first (step 0)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps; 0 = epoch ends")
    keep_last: int = Field(1, ge=1, description="resumable checkpoints kept")
    best_metric: str = Field("loss", description="validation metric that picks the kept model")
    best_mode: Literal["min", "max"] = "min"
    patience: int | None = Field(None, ge=1, description="stop after N evaluations without improvement")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient stops the run, or skips the batch"
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        [],
        description="experiment trackers that get the config, every metric and the plots (each an extra: "
        'pip install "finetune-gpt2[tensorboard]")',
    )


class FinetuneSection(Section):
    trainable: Literal["all", "last_block", "last_n_blocks", "head", "lora"] = "all"
    n_blocks: int = Field(1, ge=1, description="blocks trained with trainable=last_n_blocks")


class LoraSection(Section):
    """Used when finetune.trainable=lora; target names are listed in finetune/model/lora.py."""

    rank: int = Field(8, ge=1)
    alpha: Float = Field(16.0, gt=0.0)
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"], min_length=1)
    train_modules: list[str] = Field([], description="modules trained fully beside the adapters, e.g. [head]")


class RunConfig(Section):
    """Keys shared by every recipe; a recipe subclasses it with its own `data` section."""

    recipe: str
    output_dir: str = "runs/default"
    resume: bool = Field(False, description="continue from the newest checkpoint in output_dir")
    overwrite: bool = Field(False, description="allow replacing a finished or different run in output_dir")
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    finetune: FinetuneSection = FinetuneSection()
    lora: LoraSection = LoraSection()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other; choose one")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


C = TypeVar("C", bound=RunConfig)


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """Validate a YAML file (or the defaults, without one) with `key=value` overrides on top."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = str(path) if path else "defaults"
    if path is not None:
        raw, lines = _read_yaml(Path(path))
    override_keys = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' is not key=value (e.g. train.epochs=3)")
        _set_dotted(raw, key.split("."), _parse_value(text), item)
        override_keys.add(tuple(key.split(".")))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(_describe(e, cls, source, lines, override_keys)) from None


def _read_yaml(path: Path) -> tuple[dict, dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config ({e})") from e
    try:
        node = yaml.compose(text, Loader=_Loader)
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from e
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of keys (model:, train:, …), got {type(raw).__name__}")
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(node, (), lines)
    return raw, lines


def _key_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            out[path] = key.start_mark.line + 1
            _key_lines(value, path, out)


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, keys: list[str], value: Any, item: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{item}': '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _describe(error: ValidationError, cls: type[BaseModel], source: str, lines: dict, override_keys: set) -> str:
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc) or "config"
    if loc in override_keys:
        where = f"override {key}"
    elif loc in lines:
        where = f"{source}:{lines[loc]}: {key}"
    else:
        where = f"{source}: {key}"
    if first["type"] == "extra_forbidden":
        known = sorted(_section(cls, loc[:-1]).model_fields)
        return f"{where}: unknown key; known keys here: {', '.join(known)}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    got = "" if first["type"].startswith("value_error") else f" (got {first.get('input')!r})"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}{got}"


def _section(cls: type[BaseModel], loc: tuple[str, ...]) -> type[BaseModel]:
    for part in loc:
        annotation = cls.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return cls
        cls = annotation
    return cls
