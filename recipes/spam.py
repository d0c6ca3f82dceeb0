"""SMS spam (the book's chapter 6): the classification recipe with the SMS Spam Collection and the
book's settings as defaults.

The bundled file is read as raw `label<TAB>text` lines (the book's pandas call would merge quoted
messages), ham is undersampled to the 747 spam messages, and the split is stratified 70/10/20.
"""

from __future__ import annotations

from typing import Literal

from finetune.datasets import SMS_SPAM
from finetune.recipe_api import (
    Format,
)
from finetune.recipes.classification import Classification, ClassificationConfig
from finetune.recipes.labelled_data import ClassificationData


class SpamData(ClassificationData):
    format: Format | None = "raw"
    labels: list[str | int] | None = ["ham", "spam"]
    balance: bool = True


class SpamConfig(ClassificationConfig):
    recipe: Literal["spam"] = "spam"
    output_dir: str = "runs/spam"
    data: SpamData = SpamData()


Config = SpamConfig
RECIPE = Classification("spam", SpamConfig, bundled_data=SMS_SPAM)
