"""report.md: one run on one page, readable on its own and as a model card's body: what ran (recipe,
model, what trained, the key settings, the data, where and how long), how it did (the recipe's summary
table), its plots, and the recipe's own section (sample responses, a text sample, ...)."""

from __future__ import annotations

from pathlib import Path

from finetune.config import RunConfig


def run_report(
    recipe_name: str,
    config: RunConfig,
    summary: str,
    sizes: dict[str, int],
    parameters: tuple[int, int],
    environment: dict,
    seconds: float | None,
    plots: list[str],
    body: list[str],
) -> str:
    trainable, total = parameters
    t = config.train
    rows = [
        ("recipe", recipe_name),
        ("model", f"{config.model.name} ({config.model.init})"),
        (
            "trains",
            f"{config.finetune.trainable}: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)",
        ),
        ("data", ", ".join(f"{n:,} {split}" for split, n in sizes.items())),
        (
            "optimisation",
            f"{t.epochs} epoch(s), batch {t.batch_size} x {t.grad_accum_steps} accumulation, lr {t.lr:g} "
            f"({t.schedule}, warmup {t.warmup_steps}), weight decay {t.weight_decay:g}, seed {t.seed}",
        ),
        (
            "ran on",
            f"{environment['device']}, {environment['processes']} process(es), mixed precision "
            f"{environment['mixed_precision']}",
        ),
        ("wall time", "-" if seconds is None else f"{seconds:.0f} s"),
    ]
    if config.finetune.trainable == "lora":
        rows.insert(
            3,
            ("LoRA", f"rank {config.lora.rank}, alpha {config.lora.alpha:g}, targets {', '.join(config.lora.targets)}"),
        )
    lines = [
        f"# {recipe_name}: {config.model.name} ({config.finetune.trainable})",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Results",
        "",
        "```",
        summary,
        "```",
        "",
    ]
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    lines += body
    lines += ["", "The full config is `config.yaml`; every step's metrics are in `metrics.jsonl` (and `.csv`)."]
    return "\n".join(lines).rstrip() + "\n"
