"""Where a run keeps its checkpoints:

    <output_dir>/checkpoints/step-NNNNNNN/   resumable (model, optimizer, RNG, data position)
    <output_dir>/best/                       the model with the best validation metric
"""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoint import recover
from finetune.errors import UserError

CHECKPOINTS = "checkpoints"
BEST = "best"


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
