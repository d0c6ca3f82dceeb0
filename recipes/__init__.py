"""The bundled recipes: classification (and its SMS spam preset), instruction tuning, preference tuning
(DPO), reinforcement learning with verifiable rewards (GRPO, its rewards in `rewards.py`) and plain text.
Each module defines `RECIPE`, a `finetune.training.recipe.Recipe`, registered in pyproject's `finetune.recipes`
entry-point group exactly as a recipe from another package would be. Presets are in `configs/`, sweeps
(`finetune sweep --spec NAME`) in `sweeps/`."""

from importlib import resources
from pathlib import Path

PRESETS = Path(str(resources.files(__name__).joinpath("configs")))
