"""finetune: fine-tune GPT-2 with a readable model, recipes, hand-written LoRA and evals."""

from finetune.errors import UserError
from finetune.model import GPT, PRESETS, GPTConfig
from finetune.weights import load_pretrained

__all__ = ["GPT", "GPTConfig", "UserError", "build_model", "load_pretrained"]


def build_model(name: str, init: str = "pretrained", dropout: float = 0.0) -> GPT:
    """The model a recipe or command asks for: pretrained weights, or a random init of the same shape.

    `name` is a preset (`gpt2`, …, `gpt2-tiny`), a hub id, a checkpoint directory or a book `.pth`.
    """
    if init == "random":
        if name not in PRESETS:
            raise UserError(f"model.init=random needs a preset name ({', '.join(PRESETS)}), got '{name}'")
        return GPT(GPTConfig.from_preset(name, dropout=dropout))
    if init != "pretrained":
        raise UserError(f"model.init must be 'pretrained' or 'random', got '{init}'")
    return load_pretrained(name, dropout=dropout)
