"""A run directory and its life: created or refused, resumed, logged to, and where its checkpoints are.

<output_dir>/config.yaml                 the resolved run config
<output_dir>/metrics.jsonl, metrics.csv  one row per step (train) and per evaluation (val)
<output_dir>/checkpoints/step-NNNNNNN/   resumable (model, optimizer, RNG, data position)
<output_dir>/best/                       the model with the best validation metric
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

from finetune.checkpoints import atomic
from finetune.checkpoints.atomic import recover
from finetune.checkpoints.training_state import STATE_JSON
from finetune.config import RunConfig
from finetune.errors import UserError

CHECKPOINTS = "checkpoints"
BEST = "best"
METRICS = "metrics.jsonl"


def checkpoint_dirs(out: Path) -> list[Path]:
    """A run's resumable checkpoints, oldest first."""
    return sorted(p for p in (Path(out) / CHECKPOINTS).glob("step-*") if p.is_dir())


def kept_checkpoint(out: Path) -> Path:
    """The checkpoint a run keeps for use: best/, or else its last one."""
    recover(Path(out) / BEST)
    if (Path(out) / BEST).is_dir():
        return Path(out) / BEST
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise UserError(f"{out}: no checkpoint found (no {BEST}/ or {CHECKPOINTS}/step-*/); was the run trained?")
    return dirs[-1]


def resolve(path: Path) -> Path:
    """A checkpoint directory as given, or the kept checkpoint of a run directory (one with config.yaml)."""
    path = Path(path)
    return kept_checkpoint(path) if (path / "config.yaml").is_file() else path


def run_of(checkpoint: Path) -> Path | None:
    """The run a checkpoint belongs to (`<run>/best`, `<run>/checkpoints/step-N`), or None for a loose one."""
    for parent in Path(checkpoint).resolve().parents[:2]:
        if (parent / "config.yaml").is_file():
            return parent
    return None


# -- the run's life ------------------------------------------------------------------------------


def check_output_dir(config: RunConfig) -> None:
    """Fail before any expensive work if output_dir holds another run (or a different one on resume)."""
    out = Path(config.output_dir)
    config_file = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; choose a directory")
    if config_file.exists() and not (config.resume or config.overwrite):
        raise UserError(
            f"{out} holds a previous run; pass resume=true to continue it, overwrite=true to replace it, "
            "or choose another output_dir"
        )
    if config.resume and config_file.exists() and config_file.read_text() != saved_config(config):
        raise UserError(f"{config_file}: resume=true needs the same config as the run it continues")
    dirs = checkpoint_dirs(out)
    if config.resume and dirs and finished(dirs[-1]):
        raise UserError(f"{out}: this run already finished; use another output_dir, or overwrite=true to start again")


def finished(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / STATE_JSON).read_text()).get("finished"))
    except (OSError, ValueError):
        return False  # damaged: resume decides what to do with it


def saved_config(config: RunConfig) -> str:
    return config.model_copy(update={"resume": False, "overwrite": False}).to_yaml()


def start_run_dir(config: RunConfig) -> None:
    """Create output_dir with its config.yaml (after `check_output_dir`); with overwrite=true, first
    remove the previous run's checkpoints and metrics. Never deletes anything on resume."""
    out = Path(config.output_dir)
    if config.overwrite:
        for name in (CHECKPOINTS, BEST, METRICS, "metrics.csv"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text_atomic(out / "config.yaml", saved_config(config))


def latest_checkpoint(out: Path) -> str | None:
    """The newest checkpoint whose files match their checksums (damaged ones skipped with a warning)."""
    dirs = checkpoint_dirs(out)
    for candidate in reversed(dirs):
        try:
            atomic.verify(candidate)
        except atomic.CorruptCheckpoint as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=4)
            continue
        return str(candidate)
    if dirs:
        raise UserError(
            f"{out / CHECKPOINTS}: all {len(dirs)} checkpoints are damaged; start again with overwrite=true"
        )
    return None


# -- metrics files ---------------------------------------------------------------------------------


def append_metrics(out: Path, row: dict) -> None:
    """One row of metrics.jsonl; an evaluation row also rewrites metrics.csv."""
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
    if row["split"] != "train":
        write_metrics_csv(out)


def keep_metrics_until(out: Path, step: int) -> None:
    """Drop the rows logged after `step` (work lost to a kill, which a resume logs again)."""
    rows = [r for r in read_metrics(out) if r["step"] <= step]
    atomic.write_text_atomic(Path(out) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def write_metrics_csv(out: Path) -> None:
    rows = read_metrics(out)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = out / ".tmp-metrics.csv"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "metrics.csv")


def read_metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl; a last line cut short by a kill is dropped (it is logged again on resume)."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: damaged metrics line; delete the line to continue") from None
    return rows


# -- the run's state -----------------------------------------------------------------------------------

STATE_FILE = "run_state.json"


def mark_state(out: Path, state: str, error: str | None = None) -> None:
    """Record how the run stands (running, finished, interrupted, failed) and the seconds it has run, over
    every resume; a run killed outright stays `running` with a process id that no longer lives."""
    import os
    import time

    path = Path(out) / STATE_FILE
    previous = json.loads(path.read_text()) if path.is_file() else {}
    now = time.time()
    if state == "running":
        record = {"state": state, "pid": os.getpid(), "segment_start": now, "seconds": previous.get("seconds", 0.0)}
    else:
        seconds = previous.get("seconds", 0.0) + now - previous.get("segment_start", now)
        record = {"state": state, "seconds": seconds, **({"error": error} if error else {})}
    atomic.write_text_atomic(path, json.dumps(record, indent=2))


def run_state(out: Path) -> dict:
    """The recorded state, with `running` told apart from a run whose process is gone (interrupted)."""
    import os

    path = Path(out) / STATE_FILE
    if not path.is_file():
        return {"state": "finished" if (Path(out) / "metrics.json").is_file() else "interrupted", "seconds": None}
    record = json.loads(path.read_text())
    if record["state"] == "running":
        try:
            os.kill(record["pid"], 0)
        except (OSError, KeyError):
            record["state"] = "interrupted"
    return record
