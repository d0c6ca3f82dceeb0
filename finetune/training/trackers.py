"""Experiment trackers (`train.report_to`), through accelerate's own integrations: the resolved config as
hyper-parameters, every training and validation row of metrics.jsonl at its step, the final metrics
and the plots. File-based ones write inside the run directory (TensorBoard's events under
`<run>/tensorboard/`, MLflow's database `<run>/mlflow.db` unless MLFLOW_TRACKING_URI names another);
only the main process logs. A resumed run goes on in the same tracker run: the ids are kept in
`<run>/trackers.json`, and TensorBoard drops the steps logged after the checkpoint it resumes from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from finetune.errors import UserError

# tracker -> (the module it needs, the extra that installs it)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
IDS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: Sequence[str]) -> None:
    """Every tracker named, and its package installed: one line naming the extra to install, before any work."""
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"train.report_to: unknown tracker '{name}'; choose from {', '.join(PACKAGES)}")
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f'train.report_to: {name} needs its package: pip install "finetune-gpt2[{extra}]"')


def start_trackers(accelerator, config, resumed_step: int) -> None:
    """Open the trackers of `config.train.report_to` (main process), continuing a resumed run's."""
    if not config.train.report_to or not accelerator.is_main_process:
        return
    from accelerate.tracking import (
        MLflowTracker,
        TensorBoardTracker,
        TrackioTracker,
        WandBTracker,
    )

    out = Path(config.output_dir)
    ids = json.loads((out / IDS_FILE).read_text()) if config.resume and (out / IDS_FILE).is_file() else {}
    trackers = []
    for name in config.train.report_to:
        if name == "tensorboard":  # purge_step: what was logged after the resumed checkpoint is dropped
            trackers.append(
                TensorBoardTracker(TENSORBOARD_DIR, out, **({"purge_step": resumed_step + 1} if resumed_step else {}))
            )
        elif name == "mlflow":
            if "MLFLOW_TRACKING_URI" not in os.environ:
                import mlflow

                mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
            trackers.append(
                MLflowTracker(
                    out.name, str((out / "mlflow-artifacts").resolve()), run_id=ids.get("mlflow"), run_name=out.name
                )
            )
        elif name == "wandb":
            ids.setdefault("wandb", uuid.uuid4().hex[:8])
            trackers.append(WandBTracker(out.name, id=ids["wandb"], resume="allow", dir=str(out)))
        elif name == "trackio":
            trackers.append(TrackioTracker(out.name, name=out.name, resume="allow"))
    settings = hyperparameters(config)
    for tracker in trackers:
        tracker.start()
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        if not config.resume or tracker.name != "mlflow":  # MLflow refuses to set a parameter twice
            tracker.store_init_configuration(settings)
    accelerator.trackers.extend(trackers)
    (out / IDS_FILE).write_text(json.dumps(ids, indent=2))


def hyperparameters(config) -> dict:
    """The resolved config, flattened to `section.key` values trackers take (lists as text)."""
    flat: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config.model_dump())
    return flat


def log_row(accelerator, row: dict, step: int) -> None:
    """One metrics.jsonl row at its step, its numbers named `split/metric`."""
    if not accelerator.trackers:
        return
    split = row["split"]
    values = {
        f"{split}/{k}": v
        for k, v in row.items()
        if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    accelerator.log(values, step=step)


def log_final(accelerator, metrics: dict, out: Path, plots: list[str], step: int) -> None:
    """The final metrics (`final/<split>/<metric>`) and the plots, then close every tracker."""
    if not accelerator.trackers:
        return
    flat: dict[str, float] = {}
    for split, values in metrics.items():
        if isinstance(values, dict):
            flat |= {
                f"final/{split}/{k}": v
                for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
    accelerator.log(flat, step=step)
    for tracker in accelerator.trackers:  # only the main process has any
        for name in plots:
            _log_plot(tracker, out / name, step)
        tracker.finish()
    accelerator.trackers.clear()


def _log_plot(tracker, path: Path, step: int) -> None:
    if tracker.name == "tensorboard":
        import matplotlib.image

        tracker.writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], global_step=step, dataformats="HWC")
    elif tracker.name == "mlflow":
        import mlflow

        mlflow.log_artifact(str(path))
    elif hasattr(tracker, "log_images"):
        import matplotlib.image

        tracker.log_images({path.stem: [matplotlib.image.imread(path)]}, step=step)
