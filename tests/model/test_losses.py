"""The chunked next-token loss equals F.cross_entropy over the full logits, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from finetune import GPT, GPTConfig
from finetune.model.lora import apply_lora
from finetune.model.losses import CHUNK_ROWS, IGNORE, next_token_loss


def loss_and_grads(model, loss_fn, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn()
    (2.5 * loss).backward()  # backward scales by the incoming gradient
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def plain(model, ids, targets):
    return lambda: F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def close(grad, expected):
    """Equal up to fp32 summation order: within 1e-5 of the gradient's largest entry."""
    return (grad - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 3000, (3, CHUNK_ROWS["cpu"] // 2 + 7))  # more rows than one chunk, a partial last chunk
    targets = torch.roll(ids, -1, dims=1)
    targets[0, :20] = IGNORE  # a masked prompt
    targets[2, -30:] = IGNORE  # padding
    return ids, targets


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_matches_full_logits(batch, tied):
    ids, targets = batch
    model = GPT(GPTConfig(n_embd=48, n_layer=2, n_head=4, context_length=CHUNK_ROWS["cpu"], vocab_size=3000, tie_embeddings=tied))
    expected, expected_grads = loss_and_grads(model, plain(model, ids, targets))
    loss, grads = loss_and_grads(model, lambda: next_token_loss(model, ids, targets))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert close(grad, expected_grads[name]), name
    with torch.no_grad():
        assert next_token_loss(model, ids, targets).item() == pytest.approx(expected, rel=1e-6)


def test_chunked_loss_under_bf16_autocast_and_with_a_lora_head(batch):
    ids, targets = batch
    model = GPT(GPTConfig(n_embd=48, n_layer=2, n_head=4, context_length=CHUNK_ROWS["cpu"], vocab_size=3000, tie_embeddings=False))
    _, exact = loss_and_grads(model, plain(model, ids, targets))
    expected, expected_grads = loss_and_grads(model, plain(model, ids, targets), autocast=True)
    loss, grads = loss_and_grads(model, lambda: next_token_loss(model, ids, targets), autocast=True)
    assert loss == pytest.approx(expected, rel=1e-3)
    for name, grad in grads.items():  # as close to the fp32 gradients as bf16 autocast's own are
        error, reference_error = (grad - exact[name]).norm(), (expected_grads[name] - exact[name]).norm()
        assert error <= 2 * reference_error + 1e-3 * exact[name].norm(), name

    apply_lora(model, rank=4, alpha=8, targets=["lm_head", "attn.qkv"])  # the head's own forward is used
    torch.nn.init.normal_(model.lm_head.lora_B, std=0.02)
    expected, expected_grads = loss_and_grads(model, plain(model, ids, targets))
    loss, grads = loss_and_grads(model, lambda: next_token_loss(model, ids, targets))
    assert loss == pytest.approx(expected, rel=1e-6) and grads.keys() == expected_grads.keys()
    assert all(close(grads[n], expected_grads[n]) for n in grads)


def test_a_second_backward_through_the_same_loss_is_refused(batch):
    """Backward scales the gradients computed in forward in place; a second pass would scale them twice."""
    ids, targets = batch
    model = GPT(GPTConfig(n_embd=48, n_layer=2, n_head=4, context_length=CHUNK_ROWS["cpu"], vocab_size=3000))
    loss = next_token_loss(model, ids, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
