"""Run inside a virtual environment that has only the built wheel: every recipe's offline preset
trains from an empty working directory, and not one file of the source checkout is opened.

Usage: python installed_smoke.py CHECKOUT   (run from an empty directory)
"""

import csv
import importlib
import json
import os
import sys
from pathlib import Path

checkout = Path(sys.argv[1]).resolve()
opened_in_checkout: list[str] = []


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if Path(os.path.abspath(path)).is_relative_to(checkout):
            opened_in_checkout.append(path)


sys.addaudithook(audit)
assert Path.cwd() != checkout and not Path.cwd().is_relative_to(checkout), "run from outside the checkout"
assert not any(Path(p or ".").resolve().is_relative_to(checkout) for p in sys.path), sys.path

for generic in ("recipes", "evals", "data"):  # nothing generic is installed at top level
    try:
        importlib.import_module(generic)
    except ImportError:
        continue
    raise SystemExit(f"FAIL: `import {generic}` works in the installed environment")

import finetune  # noqa: E402
from finetune.cli import main  # noqa: E402

teams = ("billing", "shipping", "returns")
Path("tickets.csv").write_text("id,body,team\n" + "".join(
    f'{i},"ticket {i} about {team},\nsecond line",{team}\n' for i in range(30) for team in teams))

from finetune.datasets import PREFERENCES, bundled  # noqa: E402

Path("prefs.json").write_text(json.dumps(json.loads(bundled(PREFERENCES).read_text())[:40]))
assert not Path(finetune.__file__).resolve().is_relative_to(checkout), finetune.__file__
for argv in (["recipes"],
             ["run", "spam", "--config", "spam_tiny", "train.epochs=1"],
             ["run", "instruct", "--config", "instruct_tiny", "train.epochs=1", "generation.max_new_tokens=16"],
             ["run", "classification", "--config", "classification_tiny", "data.path=tickets.csv",
              "data.text_field=body", "data.label_field=team", "train.epochs=1"],
             ["predict", "runs/classification_tiny", "--data", "tickets.csv", "--text-field", "body", "--out", "p.csv"],
             ["export", "runs/classification_tiny", "exported/classifier"],
             ["export", "runs/instruct_tiny", "exported/instruct"],
             ["run", "dpo", "--config", "dpo_tiny", "data.path=prefs.json", "model.name=runs/instruct_tiny",
              "model.init=pretrained", "generation.max_new_tokens=8"],
             ["respond", "runs/dpo_tiny", "--out", "dpo-again.jsonl"]):
    print("$ finetune", " ".join(argv), flush=True)
    code = main(argv)
    assert code == 0, f"finetune {' '.join(argv)} exited {code}"
with open("p.csv", newline="", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 90, "one prediction per input row"
for run_dir in ("runs/spam_tiny", "runs/instruct_tiny", "runs/classification_tiny"):
    assert (Path(run_dir) / "metrics.json").is_file() and (Path(run_dir) / "best").is_dir(), run_dir
for exported in ("exported/classifier", "exported/instruct"):  # the tokenizer comes from the installed package
    assert all((Path(exported) / name).is_file() for name in ("config.json", "model.safetensors", "vocab.json",
                                                              "merges.txt", "README.md")), exported
assert main(["sweep", "--spec", "spam_ablation"]) == 2  # the core install has no Optuna: one line names the extra
assert not opened_in_checkout, f"files of the checkout were opened: {opened_in_checkout[:5]}"
print("installed wheel: every preset ran from an empty directory; no file of the checkout was read")
