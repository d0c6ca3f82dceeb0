"""The `README.md` an exported model carries: the Hugging Face hub's model card format (YAML front
matter the hub indexes, then Markdown), filled from the run that trained the model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune.checkpoints.interface import MULTI_LABEL, REGRESSION, REWARD, SINGLE_LABEL

SCORES = ("accuracy", "f1", "macro_f1", "loss", "perplexity", "rouge_l", "exact_match")


def model_card(
    meta: dict,
    run_dir: Path | None,
    *,
    library: str,
    base_model: str | None,
    pipeline_tag: str,
    usage: str,
    notes: list[str],
) -> str:
    """A model card: what the model is, how to load it (`usage`, Python), how it was trained, how it scored."""
    config = _read(run_dir, "config.yaml", yaml.safe_load) or {}
    metrics = _read(run_dir, "metrics.json", json.loads) or {}
    classifier = meta.get("task") == "classification"
    front = {
        "library_name": library,
        **({"base_model": base_model} if base_model else {}),
        "pipeline_tag": pipeline_tag,
        "datasets": _datasets(config.get("data") or {}),
        "metrics": list(dict.fromkeys([*_headline(metrics), *(["accuracy", "f1"] if classifier else ["perplexity"])])),
        "tags": ["gpt2", "finetune", *([config["recipe"]] if "recipe" in config else [])],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {run_dir.name if run_dir else 'GPT-2'} ({'text classification' if classifier else 'language model'})",
        "",
        f"GPT-2 ({_shape(meta)}) fine-tuned with [finetune](https://pypi.org/project/finetune-gpt2/)"
        + (f", recipe `{config['recipe']}`" if "recipe" in config else "")
        + ".",
        "",
    ]
    if classifier:
        lines += [_outputs(meta), ""]
    lines += ["## Use it", "", "```python", usage.strip(), "```", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["## Results", ""] + (
        _results(metrics) if metrics else ["No metrics.json was found beside the checkpoint.", ""]
    )
    if config:
        lines += [
            "## Training configuration",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def _outputs(meta: dict) -> str:
    """What the classifier answers."""
    names = ", ".join(f"`{name}`" for name in meta["labels"])
    problem_type = meta.get("problem_type", SINGLE_LABEL)
    if problem_type == REWARD:
        return (
            f"Reward model: one score for a prompt in the `{meta['prompt_style']}` style followed by its response "
            "(the logit; higher is preferred)."
        )
    if problem_type == REGRESSION:
        return f"Regression: predicts {names} (the logits are the predictions, in the targets' units)."
    if problem_type == MULTI_LABEL:
        cuts = ", ".join(f"`{n}` {t:g}" for n, t in zip(meta["labels"], meta["thresholds"], strict=True))
        return (
            f"Multi-label: any of {names}; a label applies when its sigmoid reaches its threshold ({cuts}). "
            "transformers' pipeline shows the probabilities (`top_k=None`) and applies no threshold."
        )
    return f"Labels: {names}."


def _read(run_dir: Path | None, name: str, parse):
    if run_dir is None or not (run_dir / name).is_file():
        return None
    return parse((run_dir / name).read_text(encoding="utf-8"))


def _shape(meta: dict) -> str:
    m = meta.get("model", {})
    return f"{m.get('n_layer')} layers, {m.get('n_embd')} wide, {m.get('n_head')} heads"


def _datasets(data: dict) -> list[str]:
    """The data files the run read, by name (the hub lists dataset ids here; local files have none)."""
    paths = [data.get(k) for k in ("path", "train_path", "val_path", "test_path")]
    names = []
    for p in paths:
        for item in p if isinstance(p, list) else [p]:
            if item and Path(str(item)).name not in names:
                names.append(Path(str(item)).name)
    return names or ["bundled"]


def _results(metrics: dict) -> list[str]:
    splits = [s for s in ("train", "val", "test") if isinstance(metrics.get(s), dict)]
    columns = [c for c in dict.fromkeys([*_headline(metrics), *SCORES]) if any(c in metrics[s] for s in splits)]
    rows = ["| split | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for s in splits:
        rows.append(f"| {s} | " + " | ".join(_number(metrics[s].get(c)) for c in columns) + " |")
    responses = metrics.get("responses")
    if isinstance(responses, dict):
        rows += ["", "Generated test responses: " + ", ".join(f"{k} {_number(v)}" for k, v in responses.items())]
    return rows + [""]


def _headline(metrics: dict) -> list[str]:
    """The metric the recipe leads with (recorded in metrics.json since 0.3), first in the card."""
    return [metrics["headline_metric"]] if isinstance(metrics.get("headline_metric"), str) else []


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
