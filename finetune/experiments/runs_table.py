"""`finetune runs`: every run under a directory in one table, to compare them: recipe, model, what
trains, the settings that differ between them, epochs done, the best validation metric, test metrics,
wall time and state (finished, interrupted, failed, running). Also JSON and CSV, for machines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from finetune.checkpoints.run_directory import read_metrics, run_state
from finetune.errors import UserError

IGNORED = {"output_dir", "resume", "overwrite"}  # settings that differ between any two runs and say nothing


def find_runs(root: Path) -> list[Path]:
    """Run directories (with config.yaml) under `root`, itself included, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    return sorted({p.parent for p in root.rglob("config.yaml") if not any(part.startswith(".") for part in p.parts)})


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for key, inner in value.items():
            out |= _flat(inner, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix: value}


def run_row(run: Path, root: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    flat = _flat(config)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    rows = read_metrics(run)
    train = flat.get("train.best_metric", "loss"), flat.get("train.best_mode", "min")
    val = [r[train[0]] for r in rows if r["split"] == "val" and isinstance(r.get(train[0]), (int, float))]
    best = (min(val) if train[1] == "min" else max(val)) if val else None
    state = run_state(run)
    row = {
        "run": str(run.relative_to(root)) if run != root else ".",
        "recipe": config.get("recipe"),
        "model": flat.get("model.name"),
        "trainable": flat.get("finetune.trainable"),
        "epochs": round(max((r["epoch"] for r in rows), default=0.0), 2),
        f"best_val_{train[0]}": best,
        "seconds": None if state.get("seconds") is None else round(state["seconds"], 1),
        "state": state["state"],
    }
    test = metrics.get("test") or {}
    headline = metrics.get("headline_metric") or (
        "accuracy" if "accuracy" in test else "loss"
    )  # runs before 0.3 name none
    row["headline"] = f"test.{headline}"
    for split in ("val", "test"):
        for key, value in (metrics.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{split}.{key}"] = value
    row["_settings"] = {k: v for k, v in flat.items() if k not in IGNORED}
    if state.get("error"):
        row["error"] = state["error"]
    return row


def runs_table(root: Path, sort: str | None = None, descending: bool = False) -> list[dict]:
    """One row per run; the settings that differ between runs become columns of their own."""
    root = Path(root)
    rows = [run_row(run, root) for run in find_runs(root)]
    keys = sorted({k for r in rows for k in r["_settings"]})
    differing = [k for k in keys if len({json.dumps(r["_settings"].get(k), sort_keys=True) for r in rows}) > 1]
    for r in rows:
        settings = r.pop("_settings")
        r.update({k: settings.get(k) for k in differing if k not in ("model.name", "finetune.trainable")})
    if sort is not None:
        if rows and not any(sort in r for r in rows):
            columns = sorted({k for r in rows for k in r})
            raise UserError(f"--sort {sort}: no run has it; columns: {', '.join(columns)}")
        present = [r for r in rows if r.get(sort) is not None]
        present.sort(key=lambda r: r[sort], reverse=descending)
        rows = present + [r for r in rows if r.get(sort) is None]
    return rows


def columns_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k != "error"))


def as_text(rows: list[dict], sort: str | None = None) -> str:
    """The columns a person compares: who, what differs, how far, how good (the test split's headline metric,
    which each recipe declares), how long, and how it ended; --json and --csv have every metric."""
    if not rows:
        return "no runs found"
    main = [
        c
        for c in columns_of(rows)
        if c in ("run", "recipe", "model", "trainable")
        or (c not in FIXED and "." in c and not c.startswith(("val.", "test.")))
    ]
    score = [c for c in dict.fromkeys(r["headline"] for r in rows) if any(c in r for r in rows)]
    columns = main + [
        "epochs",
        *[c for c in columns_of(rows) if c.startswith("best_val_")],
        *score,
        *([sort] if sort and sort not in main + score else []),
        "seconds",
        "state",
    ]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


FIXED = {"run", "recipe", "model", "trainable", "epochs", "seconds", "state"}


def as_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns_of(rows) + (["error"] if any("error" in r for r in rows) else []))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
