"""Typed configs: YAML + overrides, errors that name the key and the file line."""

import pytest
from finetune.recipes import PRESETS
from finetune.recipes.spam import SpamConfig

from finetune.config import load_config
from finetune.errors import UserError
from finetune.training.registry import load_run_config
from tests.helpers import cli, one_line_error


def test_presets_validate_and_overrides_apply():
    config = load_run_config("spam", None, ["train.epochs=3", "model.name=gpt2-medium", "train.lr=1e-4"])
    assert (config.train.epochs, config.model.name, config.train.lr) == (3, "gpt2-medium", 1e-4)
    assert config.finetune.trainable == "last_block" and config.train.seed == 123  # the book's settings
    for path in PRESETS.glob("*.yaml"):
        load_run_config(None, path, [])


def test_unknown_key_names_file_line_and_known_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: spam\ntrain:\n  epochs: 2\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"c.yaml:4: train.epoch: unknown key; known keys here: .*epochs"):
        load_config(SpamConfig, path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-1", r"override train.epochs: .*greater than or equal to 1"),
        ("train.epochs=abc", r"override train.epochs: .*valid integer"),
        ("train.epochs=true", r"override train.epochs: .*valid integer"),
        ("train.lr=fast", r"override train.lr: .*valid number"),
        ("finetune.trainable=everything", r"override finetune.trainable: .*'all'"),
        ("data.bogus=1", r"override data.bogus: unknown key"),
        ("train.epochs", r"not key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message):
        load_config(SpamConfig, None, [override])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("recipe: spam\ntrain:\n  epochs: [1,\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(SpamConfig, path)


def test_validate_cli(capsys, tmp_path):
    code, out, _ = cli(capsys, "validate", str(PRESETS / "spam.yaml"), "train.epochs=2")
    assert code == 0 and "epochs: 2" in out
    assert "train.epochs" in one_line_error(capsys, "validate", str(PRESETS / "spam.yaml"), "train.epochs=-1")
    assert "no such config file" in one_line_error(capsys, "validate", str(tmp_path / "none.yaml"))
    assert "unknown recipe" in one_line_error(capsys, "run", "nosuch")


def test_yaml_reads_no_and_yes_as_words_not_booleans(tmp_path):
    """`mixed_precision: no` is a value of its own; YAML 1.1 would make it False and refuse it."""
    path = tmp_path / "run.yaml"
    path.write_text("recipe: spam\ntrain:\n  mixed_precision: no\n")
    assert load_config(SpamConfig, path).train.mixed_precision == "no"
    assert load_config(SpamConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(SpamConfig, None, ["resume=true"]).resume is True
