"""The config reference comes from the typed config: `finetune config RECIPE` lists every key with its
type, default and description, and the docs' reference pages are exactly its Markdown."""

import re
from pathlib import Path

import pytest

from finetune.training.config_reference import as_markdown, config_keys
from finetune.training.registry import recipe, recipe_names
from tests.helpers import cli

DOCS = Path(__file__).parent.parent.parent / "docs" / "reference"


@pytest.mark.parametrize("name", recipe_names())
def test_the_reference_pages_are_the_code(name):
    page = DOCS / f"config-{name}.md"
    assert page.is_file(), f"regenerate: finetune config {name} --markdown > {page}"
    assert page.read_text() == as_markdown(name, config_keys(recipe(name).Config)), (
        f"{page} differs from the code; regenerate: finetune config {name} --markdown > {page}")


def test_every_key_the_config_takes_is_listed_with_its_default(capsys):
    code, out, _ = cli(capsys, "config", "dpo")
    assert code == 0
    keys = [line.split()[0] for line in out.splitlines()[1:] if line and not line.startswith(" ")]
    for key in ("train.lr", "lora.rank", "dpo.beta", "dpo.logprob_reduction", "data.prompt_style", "train.report_to"):
        assert key in keys, key
    assert re.search(r"\nmodel\.name +str = runs/instruct\n", out)  # the recipe's own default, not the section's
    assert "dpo.beta" in out and "how far the policy may move from the reference" in out
