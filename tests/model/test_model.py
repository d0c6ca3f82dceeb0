"""Our GPT computes what transformers' GPT-2 computes, on checkpoints in the real layout."""

import pytest
import torch

from finetune import GPT, GPTConfig, load_pretrained
from finetune.model.classifier import GPTClassifier


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_parameters() == 124_439_808


def test_presets_have_the_gpt2_shapes():
    with torch.device("meta"):
        counts = {name: GPT(GPTConfig.from_preset(name)).num_parameters() for name in ("gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert counts == {"gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    with torch.device("meta"):
        assert GPT(GPTConfig.from_preset("gpt2-tiny")).num_parameters() < 10_000_000


def test_a_model_is_built_where_the_caller_builds():
    """Loading builds on the meta device and assigns the weights: a model that lands on the CPU there
    holds a second copy (torch < 2.8 reports the CPU as the default device inside `with torch.device`)."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2-xl"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.device.type for p in GPT(GPTConfig.from_preset("gpt2-tiny")).parameters()} == {"cpu"}


def test_logits_match_transformers_124m(gpt2_hf):
    directory, hf = gpt2_hf
    ours = load_pretrained(directory).eval()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5


def test_logits_match_transformers_odd_heads_full_context(small_hf):
    directory, hf = small_hf
    ours = load_pretrained(directory).eval()
    assert ours.config.n_head == 5 and ours.config.context_length == 97
    idx = torch.randint(0, 50257, (3, 97), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(idx, output_hidden_states=True)
        assert (ours(idx) - ref.logits).abs().max().item() <= 1e-5
        assert (ours(idx, return_hidden=True) - ref.hidden_states[-1]).abs().max().item() <= 1e-5


def test_padding_mask_leaves_real_tokens_unchanged(small_hf):
    ours = load_pretrained(small_hf[0]).eval()
    idx = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0).long()
    with torch.no_grad():
        expected = ours(idx)
        got = ours(padded, attention_mask=mask, positions=positions)[:, 4:]
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pool", ["last_token", "last_position"])
def test_classifier_runs_the_last_block_at_the_pooled_position_only(pool):
    """Same logits as the whole final hidden state read at the pooled position, also from cached features."""
    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(n_embd=48, n_layer=3, n_head=4, context_length=32)), 3, pool).eval()
    ids = torch.randint(0, 50257, (4, 20))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 15:] = 0, 0
    index = torch.tensor([19, 6, 14, 19]) if pool == "last_token" else torch.full((4,), 19)
    with torch.no_grad():
        hidden = model.gpt(ids, return_hidden=True)
        expected = model.head(hidden[torch.arange(4), index])
        assert torch.allclose(model(ids, mask), expected, atol=1e-6)
        for start in (1, 2):
            features = model.features(ids, start)
            assert torch.allclose(model(hidden=features, index=index, start=start), expected, atol=1e-6)


def test_frozen_blocks_build_no_autograd_graph():
    """With the last block trainable, nothing below it records operations for backward."""
    from finetune.training.trainable import mark_trainable

    torch.manual_seed(0)
    model = GPTClassifier(GPT(GPTConfig(n_embd=48, n_layer=3, n_head=4, context_length=32)), 2)
    mark_trainable(model, "last_block")
    outputs = []
    for block in model.gpt.blocks:
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
    logits = model(torch.randint(0, 50257, (2, 10)))
    assert len(outputs) == 2 and all(out.grad_fn is None for out in outputs)  # the last block runs pooled, hook-free
    assert logits.grad_fn is not None
