"""Activation checkpointing (`train.activation_checkpointing`): each block runs again in the backward pass
instead of keeping its activations, and every gradient is what it is without it: the whole model, LoRA
adapters on a frozen base (where a reentrant checkpoint passes no gradient through frozen inputs), a
classifier's trunk, dropout included (the recompute replays the same random numbers)."""

import pytest
import torch
import torch.utils.checkpoint

from finetune.model.classifier import GPTClassifier
from finetune.model.gpt import GPT, GPTConfig
from finetune.model.lora import apply_lora
from finetune.model.losses import next_token_loss

CONFIG = dict(n_embd=32, n_layer=3, n_head=4, context_length=32, dropout=0.1)


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**CONFIG))
    if kind == "lora":
        apply_lora(gpt, rank=4, alpha=8.0, targets=["attn.qkv", "attn.proj", "mlp.fc"])  # the base frozen
        for name, p in gpt.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters something to pass back
                torch.nn.init.normal_(p, std=0.02)
    return GPTClassifier(gpt, 3) if kind == "classifier" else gpt


def count_block_runs(gpt: GPT) -> list[int]:
    """A list that grows by one whenever a block's forward runs (forward hooks do not see a recompute)."""
    calls: list[int] = []
    for block in gpt.blocks:
        def counted(*args, forward=block.forward, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        block.forward = counted
    return calls


def gradients(kind: str, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Every trainable parameter's gradient after one seeded forward and backward, and how many times the
    blocks ran."""
    model = build(kind).train()
    gpt = model.gpt if isinstance(model, GPTClassifier) else model
    gpt.activation_checkpointing = checkpointing
    calls = count_block_runs(gpt)
    torch.manual_seed(1)
    ids = torch.randint(0, CONFIG["context_length"] * 10, (4, 16))
    torch.manual_seed(2)  # the dropout masks
    if kind == "classifier":
        loss = torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 1, 2, 0]))
    else:
        loss = next_token_loss(model, ids[:, :-1], ids[:, 1:]) / ids[:, 1:].numel()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("kind", ["full", "lora", "classifier"])
def test_gradients_equal_without_checkpointing(kind):
    plain, plain_calls = gradients(kind, checkpointing=False)
    checked, checked_calls = gradients(kind, checkpointing=True)
    assert plain.keys() == checked.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checked[name], rtol=0, atol=1e-7), name
    assert all(g.abs().sum() > 0 for n, g in checked.items() if "lora_" in n)  # adapters learn through it
    body = CONFIG["n_layer"] - (1 if kind == "classifier" else 0)  # a classifier's last block reads one position
    assert checked_calls == plain_calls + body  # each checkpointed block ran again in the backward pass


def test_no_recompute_in_evaluation_or_generation():
    model = build("full").eval()
    model.activation_checkpointing = True
    calls = count_block_runs(model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert len(calls) == CONFIG["n_layer"]


def test_a_run_with_checkpointing_is_the_run_without(tmp_path, capsys, monkeypatch):
    """Through the CLI: the setting reaches the model (blocks are checkpointed, and only with it) and the
    losses are the same at every step and evaluation, dropout on and the trunk trained."""
    import json

    import finetune.model.gpt as gpt_module
    from tests.helpers import cli, small_spam_file, tiny_spam_args

    checkpointed = []

    def counted(*args, **kwargs):
        checkpointed.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(gpt_module, "checkpoint", counted)
    data = small_spam_file(tmp_path / "sms.tsv")
    losses, runs = {}, {}
    for flag in ("false", "true"):
        checkpointed.clear()
        out = tmp_path / flag
        code, _, err = cli(capsys, *tiny_spam_args(data, out, "model.dropout=0.1", "train.epochs=1",
                                                  f"train.activation_checkpointing={flag}"))
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in rows if r["split"] in ("train", "val")]
        runs[flag] = len(checkpointed)
    assert runs["false"] == 0 and runs["true"] > 0, runs
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6, abs=1e-7) and len(losses["true"]) > 2
