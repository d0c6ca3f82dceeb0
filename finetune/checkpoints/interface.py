"""What a trained model is, stored with it: its task (a language model, or a classifier: its problem type and
outputs), the prompt style it was trained with and its generation defaults.

Every finetune checkpoint records these in its config.json (`task`, `labels`, `problem_type` and what
reading the outputs needs, `prompt_style`, `generation`); exports carry them in the files other tools read
(a `chat_template` and `finetune_*` keys in tokenizer_config.json, generation_config.json, transformers'
`problem_type` and `id2label`) and are read back from there. Commands that use a model
(`serve`, `chat`, `respond`, `classify`, `predict`, `generate`) read only this.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.data.files import read_json_object
from finetune.data.prompts import check_style
from finetune.errors import UserError
from finetune.model.tokenizer import EOT_ID

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
STYLE_KEY = "finetune_prompt_style"  # beside chat_template in tokenizer_config.json: the style by name
MAX_NEW_TOKENS_KEY = "finetune_max_new_tokens"  # in generation_config.json: the run's reply length
CLASSIFIER_EXPORT_KEYS = {  # a classifier's interface beside its tokenizer, in both exports (PEFT's config has none)
    "problem_type": "finetune_problem_type",
    "labels": "finetune_labels",
    "thresholds": "finetune_thresholds",
    "prompt_style": STYLE_KEY,  # a reward model's
}

# What a classifier's outputs mean, in transformers' `problem_type` names: one class of several (softmax),
# any set of labels (a sigmoid and a threshold per label), or numbers (in the target's units once the
# stored standardisation is undone); and a reward model's one number for a prompt and its response, both
# in the model's prompt style (exported as transformers' `regression`, which is how TRL's reward models
# load). Checkpoints from before multi-label and regression are single-label.
SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
REWARD = "reward"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION, REWARD)


@dataclass(frozen=True)
class Generation:
    """How a model answers unless a request says otherwise."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)  # the reply ends before the first of these
    seed: int = 123  # of the sampler, when temperature > 0: the run's seed, so its responses can be re-made


@dataclass(frozen=True)
class Interface:
    task: str  # "lm" or "classification"
    labels: list[str] | None = None  # a classifier's classes, labels or targets, in head order
    prompt_style: str | None = None  # how instructions are prompted; None: text is continued as it is
    generation: Generation = Generation()
    problem_type: str | None = None  # a classifier's: one of PROBLEM_TYPES

    @property
    def instruct(self) -> bool:
        return self.prompt_style is not None


def interface_meta(prompt_style: str | None, generation, seed: int) -> dict:
    """The checkpoint entries of a language model trained with `prompt_style` and `generation` (a
    config section with max_new_tokens, temperature, top_k, top_p and optionally stop)."""
    values = {key: getattr(generation, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p")}
    values |= {"stop": list(getattr(generation, "stop", [])), "seed": seed}
    return {"prompt_style": prompt_style, "generation": values}


def interface_of(meta: dict) -> Interface:
    """The interface a checkpoint's metadata records."""
    generation = meta.get("generation") or {}
    try:
        problem_type = meta.get("problem_type", SINGLE_LABEL) if meta["task"] == "classification" else None
        return Interface(
            meta["task"], meta.get("labels"), meta.get("prompt_style"), Generation(**generation), problem_type
        )
    except (KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata: bad task or generation entry ({e})") from e


TASKS = ("lm", "classification")  # what the commands that use a model know how to use
CLASSIFIER_KEYS = ("labels", "num_classes", "max_length", "keep", "pool")  # what classify, predict and serve read


def check_usable(meta: dict, who: str) -> None:
    """Everything the commands that use a model will read from its checkpoint, checked before training
    starts, so a recipe cannot train for an hour and leave a model nothing can use. `who` opens the error."""
    task = meta.get("task")
    if task not in TASKS:
        raise UserError(
            f"{who}: the model's meta['task'] is {task!r}; finetune can use {' or '.join(map(repr, TASKS))} "
            "models (set it in Setup.meta)"
        )
    interface_of(meta)  # the generation entry and prompt style are well formed
    if meta.get("prompt_style") is not None:
        check_style(meta["prompt_style"], f"{who}: meta['prompt_style']")
    if task == "classification":
        missing = [key for key in CLASSIFIER_KEYS if key not in meta]
        if missing:
            raise UserError(
                f"{who}: a classifier's meta needs {', '.join(CLASSIFIER_KEYS)}; missing {', '.join(missing)}"
            )
        labels = meta["labels"]
        if (
            not isinstance(labels, list)
            or not all(isinstance(name, str) for name in labels)
            or len(labels) != meta["num_classes"]
        ):
            raise UserError(
                f"{who}: meta['labels'] must list the {meta['num_classes']} class names as strings, "
                f"in head order; got {labels!r}"
            )
        _check_outputs(meta, who)


def _check_outputs(meta: dict, who: str) -> None:
    """A classifier's problem type, and what reading its outputs needs: thresholds per label (multi-label),
    the targets' mean and standard deviation (regression)."""
    problem_type, count = meta.get("problem_type", SINGLE_LABEL), meta["num_classes"]
    if problem_type not in PROBLEM_TYPES:
        raise UserError(f"{who}: meta['problem_type'] is {problem_type!r}; expected one of {', '.join(PROBLEM_TYPES)}")
    needs = {MULTI_LABEL: ("thresholds",), REGRESSION: ("target_mean", "target_std")}.get(problem_type, ())
    for key in needs:
        values = meta.get(key)
        if not (isinstance(values, list) and len(values) == count and all(isinstance(v, (int, float)) for v in values)):
            raise UserError(f"{who}: a {problem_type} model's meta[{key!r}] must list {count} numbers; got {values!r}")
    if problem_type == REGRESSION and not all(v > 0 for v in meta["target_std"]):
        raise UserError(f"{who}: meta['target_std'] must be positive; got {meta['target_std']!r}")
    if problem_type == REWARD and (count != 1 or meta.get("prompt_style") is None):
        raise UserError(
            f"{who}: a reward model has one output and a prompt_style; got {count} and {meta.get('prompt_style')!r}"
        )


def legacy_interface(meta: dict, checkpoint: Path, run_dir: Path | None) -> dict:
    """A checkpoint written before checkpoints stored their interface (finetune 0.2 and earlier): an
    instruct run's model gets the style that run's recipe implied (alpaca) and its generation settings."""
    if "prompt_style" in meta or meta.get("task") != "lm" or run_dir is None:
        return meta
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return meta
    if config.get("recipe") != "instruct":
        return meta
    warnings.warn(
        f"{checkpoint}: written before checkpoints stored their prompt style; prompting it in the "
        "alpaca style its instruct run used",
        stacklevel=2,
    )
    generation = {k: v for k, v in (config.get("generation") or {}).items() if k in Generation.__dataclass_fields__}
    generation["seed"] = (config.get("train") or {}).get("seed", Generation.seed)
    return {**meta, "prompt_style": "alpaca", "generation": generation}


# -- exports -------------------------------------------------------------------------------------


def generation_config(meta: dict) -> dict:
    """generation_config.json: the model's generation defaults in transformers' names.

    The length is `max_length` = the context, not the run's `max_new_tokens`: transformers lets a stored
    `max_new_tokens` win over a caller's explicit `max_length` (lm-evaluation-harness passes one), which
    would cut every such caller at the run's length. A plain generate() then answers until end-of-text or
    the context, as Llama's exports do; the run's own length is kept under MAX_NEW_TOKENS_KEY for finetune."""
    config: dict[str, Any] = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    if meta.get("task") != "lm" or "generation" not in meta:
        return config
    g = interface_of(meta).generation
    config |= {
        "max_length": meta["model"]["context_length"],
        MAX_NEW_TOKENS_KEY: g.max_new_tokens,
        "do_sample": g.temperature > 0,
    }
    if g.temperature > 0:
        config |= {"temperature": g.temperature, "top_k": g.top_k or 0, "top_p": g.top_p or 1.0}
    if g.stop:
        config["stop_strings"] = g.stop
    return config


def classifier_export_keys(meta: dict) -> dict:
    """The entries a classifier's exports add to tokenizer_config.json."""
    return {key: meta[name] for name, key in CLASSIFIER_EXPORT_KEYS.items() if name in meta}


def read_export_interface(directory: Path) -> dict:
    """The prompt style and generation defaults an export carries, or a classifier's problem type, labels and
    thresholds (nothing, for other models)."""
    found: dict = {}
    tokenizer = _json_file(Path(directory) / TOKENIZER_CONFIG)
    found |= {name: tokenizer[key] for name, key in CLASSIFIER_EXPORT_KEYS.items() if key in tokenizer}
    if isinstance(tokenizer.get(STYLE_KEY), str):
        found["prompt_style"] = check_style(tokenizer[STYLE_KEY], f"{directory / TOKENIZER_CONFIG}: {STYLE_KEY}")
    config = _json_file(Path(directory) / GENERATION_CONFIG)
    length = config.get(MAX_NEW_TOKENS_KEY, config.get("max_new_tokens"))  # the latter: exports before 0.3
    if length is not None:
        sampled = config.get("do_sample", False)
        found["generation"] = asdict(
            Generation(
                max_new_tokens=int(length),
                temperature=float(config.get("temperature", 1.0)) if sampled else 0.0,
                top_k=(config.get("top_k") or None) if sampled else None,
                top_p=(config["top_p"] if config.get("top_p", 1.0) < 1.0 else None) if sampled else None,
                stop=list(config.get("stop_strings") or []),
            )
        )
    return found


def _json_file(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}
