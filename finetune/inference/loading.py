"""A model loaded for use, with what it is: whatever a command is given (a run directory, any of its
checkpoints, a merged model, a transformers or PEFT export, a hub id, a book .pth), the model and its
stored interface (`finetune.checkpoints.interface`), never the recipe that trained it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from finetune.checkpoints.interface import Interface, interface_of
from finetune.data.prompts import check_style
from finetune.errors import UserError
from finetune.formats.loading import build_model, load_with_meta
from finetune.model.classifier import GPTClassifier, Model
from finetune.model.gpt import GPT


@dataclass
class Loaded:
    model: Model
    meta: dict  # what the checkpoint records (task, shape, labels, max_length, …)
    interface: Interface
    name: str  # how to call it: the directory's name, or the hub id

    @classmethod
    def of(cls, model: Model, meta: dict, name: str) -> Loaded:
        """A model in memory and the metadata a checkpoint of it would record."""
        model.eval()
        return cls(model, meta, interface_of(meta), name)

    @property
    def classifier(self) -> bool:
        return isinstance(self.model, GPTClassifier)

    @property
    def language_model(self) -> GPT:
        """The model, which the caller knows to be a language model (load_language_model checked)."""
        if not isinstance(self.model, GPT):
            raise UserError(f"{self.name}: a classifier, not a language model")
        return self.model

    @property
    def classifier_model(self) -> GPTClassifier:
        """The model, which the caller knows to be a classifier (load_classifier checked)."""
        if not isinstance(self.model, GPTClassifier):
            raise UserError(f"{self.name}: a language model, not a classifier")
        return self.model


def load_for_use(target: str, init: str = "pretrained", bf16: bool = False, prompt_style: str | None = None) -> Loaded:
    """The model `target` names, in eval mode; `prompt_style` applies to a language model that stores none."""
    if init == "pretrained":
        model, meta = load_with_meta(target)
    else:
        model = build_model(target, init)
        meta = model.checkpoint_meta()
    interface = interface_of(meta)
    if prompt_style is not None and interface.task == "lm" and interface.prompt_style is None:
        interface = replace(interface, prompt_style=check_style(prompt_style, "--prompt-style"))
    path = Path(target)
    if bf16:
        model.to(torch.bfloat16)
    model.eval()
    return Loaded(model, meta, interface, path.name if path.exists() else target)


def load_language_model(target: str, command: str, bf16: bool = False, prompt_style: str | None = None) -> Loaded:
    """A language model for `command`; a classifier is refused in one line."""
    loaded = load_for_use(target, bf16=bf16, prompt_style=prompt_style)
    if loaded.classifier:
        raise UserError(f"{target}: a classifier; {command} needs a language model (use finetune classify or predict)")
    return loaded


def load_classifier(target: str) -> Loaded:
    """A classifier for classify and predict; a language model is refused in one line."""
    loaded = load_for_use(target)
    if not loaded.classifier:
        raise UserError(
            f"{target}: a language model, not a classifier; give a classification run or checkpoint "
            "(use finetune generate, chat or respond for a language model)"
        )
    return loaded
