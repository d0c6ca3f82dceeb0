"""What an installed toolkit offers before any recipe runs: presets by name, the version, bundled data
checked by checksum, and a command line that answers without loading torch.

The wheel itself (built, installed in a fresh virtual environment, run from an empty directory) is
checked by .ci/wheel_check.
"""

import shutil
import subprocess
import sys

import finetune.datasets
import pytest
from finetune.datasets import SMS_SPAM, bundled

from finetune.training.registry import config_path, presets
from tests.helpers import cli, one_line_error


def test_presets_are_named_by_stem_with_their_purpose(capsys):
    names = {p.name: p for p in presets()}
    assert {"spam", "spam_tiny", "spam_lora", "instruct", "instruct_tiny", "instruct_lora"} <= set(names)
    assert config_path("spam_tiny") == names["spam_tiny"].path
    assert config_path("spam_tiny.yaml") == names["spam_tiny"].path
    code, out, _ = cli(capsys, "recipes")
    assert code == 0
    assert "spam_tiny" in out and names["spam_tiny"].purpose in out and "site-packages" not in out
    code, out, _ = cli(capsys, "validate", "spam_tiny", "train.epochs=1")
    assert code == 0 and "epochs: 1" in out
    assert "no such config file or preset" in one_line_error(capsys, "validate", "spam_huge")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        from finetune.cli import build_parser
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("finetune ") and "finetune-gpt2" in out


def test_help_does_not_import_torch():
    code = "import sys; from finetune.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "torch" not in done.stderr, done.stderr


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_missing_or_altered_bundled_file_is_one_line(tmp_path, monkeypatch, capsys, damage):
    copy = tmp_path / "data"
    shutil.copytree(bundled(SMS_SPAM).parent.parent, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    target = copy / SMS_SPAM.relative
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes().replace(b"ham\t", b"spam\t", 1))
    files = finetune.datasets.resources.files
    monkeypatch.setattr(finetune.datasets.resources, "files", lambda package: copy if package == "finetune.datasets" else files(package))
    line = one_line_error(capsys, "run", "spam", "--config", "spam_tiny", f"output_dir={tmp_path / 'run'}")
    assert str(target) in line and ("missing" if damage == "missing" else "checksum mismatch") in line
    assert not (tmp_path / "run").exists()
