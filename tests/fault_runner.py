"""Runs the finetune CLI with a pause planted at one point, so a test can kill it there.

    python tests/fault_runner.py POINT MARKER finetune-args...

At the point it touches MARKER, then waits (forever, or for `slow` keeps training slowly).
"""

import os
import sys
import time
from pathlib import Path

point, marker, *argv = sys.argv[1:]


def arrived() -> None:
    """MARKER holds this process's pid; under a launcher each rank writes MARKER.rankN."""
    path = Path(marker) if "RANK" not in os.environ else Path(f"{marker}.rank{os.environ['RANK']}")
    path.write_text(str(os.getpid()))


def wait_forever() -> None:
    arrived()
    while True:
        time.sleep(1)


def after_call(owner, name: str, n: int, then) -> None:
    """Make the n-th call of owner.name run, then call `then`."""
    original, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            then()
        return result

    setattr(owner, name, patched)


if point == "mid-epoch":  # after the 8th optimizer step (checkpoints of steps 6 and 7 exist)
    from finetune.training.trainer import Trainer

    after_call(Trainer, "_optimizer_step", 8, wait_forever)
elif point == "mid-eval":  # inside the 2nd evaluation (the end of epoch 1, before its checkpoint)
    from finetune.recipes.classification import ClassificationTask

    after_call(ClassificationTask, "evaluate", 2, wait_forever)
elif point == "mid-checkpoint-write":  # step 6's checkpoint: model written, training state not yet
    import finetune.checkpoints.training_state as training_state

    original_save = training_state.save_file

    def save_file(tensors, path, *args, **kwargs):
        if ".tmp-step-0000006" in str(path) and Path(path).name == training_state.STATE_TENSORS:
            wait_forever()
        return original_save(tensors, path, *args, **kwargs)

    training_state.save_file = save_file
elif point == "slow":  # every step takes a while; the marker appears after step 4
    from finetune.training.trainer import Trainer

    after_call(Trainer, "_optimizer_step", 4, arrived)
    original_step = Trainer._optimizer_step

    def slow_step(self, micro, lr):
        time.sleep(0.3)
        return original_step(self, micro, lr)

    Trainer._optimizer_step = slow_step
else:
    raise SystemExit(f"unknown point {point}")

from finetune.cli import main  # noqa: E402

sys.exit(main(argv))
