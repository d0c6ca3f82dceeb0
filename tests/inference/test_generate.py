"""Generation equals transformers' greedy decoding; cache, EOS, sampling and long prompts behave."""

import pytest
import torch

from finetune import load_pretrained
from finetune.inference.generate import filter_logits, generate

PROMPTS = [[464, 2068, 7586, 21831, 18045], [40, 1101], [1212, 318, 257]]


@pytest.fixture(scope="module")
def models(small_hf):
    directory, hf = small_hf
    return load_pretrained(directory).eval(), hf


def test_greedy_matches_transformers_for_a_ragged_batch(models):
    ours, hf = models
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    got = generate(ours, PROMPTS, max_new_tokens=30)
    assert [row[len(p):] for row, p in zip(got, PROMPTS)] == ref[:, T:].tolist()
    assert all(len(row) == len(p) + 30 for row, p in zip(got, PROMPTS))


def test_cache_and_no_cache_give_identical_tokens(models):
    ours, _ = models
    assert generate(ours, PROMPTS, 30) == generate(ours, PROMPTS, 30, use_cache=False)
    sampled = [
        generate(ours, PROMPTS, 20, temperature=0.8, top_k=40, top_p=0.9,
                 generator=torch.Generator().manual_seed(7), use_cache=cache)
        for cache in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_tensor_prompts_return_a_tensor(models):
    ours, _ = models
    idx = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    out = generate(ours, idx, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], idx)


def test_each_sequence_stops_at_its_own_eos(models):
    ours, _ = models
    free = generate(ours, PROMPTS, 12)
    eos = free[0][len(PROMPTS[0]) + 3]  # the 4th token the first prompt generates
    stopped = generate(ours, PROMPTS, 12, eos_id=eos)
    n = len(stopped[0]) - len(PROMPTS[0])  # the same number of new tokens for every row
    for row, free_row, p in zip(stopped, free, PROMPTS):
        new = free_row[len(p):]
        expected = new[: new.index(eos) + 1] if eos in new else new
        assert row == p + expected[:n] + [eos] * (n - len(expected[:n]))  # padded with eos after stopping
    assert stopped[0][len(PROMPTS[0]) + 3] == eos and stopped[0][-1] == eos
    assert n == max(f[len(p):].index(eos) + 1 if eos in f[len(p):] else 12 for f, p in zip(free, PROMPTS))
    as_tensor = generate(ours, torch.tensor([PROMPTS[0]]), 12, eos_id=eos)
    first = len(PROMPTS[0]) + free[0][len(PROMPTS[0]):].index(eos)
    assert (as_tensor[0, first:] == eos).all()


def test_sampling_limits(models):
    ours, _ = models
    greedy = generate(ours, PROMPTS, 10)
    assert generate(ours, PROMPTS, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)) == greedy
    assert generate(ours, PROMPTS, 10, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)) == greedy
    runs = [generate(ours, PROMPTS, 10, temperature=1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0] == runs[1] != greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.3, 50, None), (1.0, None, 0.9),
                                                       (0.8, 40, 0.95), (2.0, 5, 0.5), (0.5, None, 0.3)])
def test_sampling_filters_equal_transformers_warpers(temperature, top_k, top_p):
    """On fixed logits: the same tokens kept, with the same probabilities, as transformers' warpers in
    the order its generate applies them (temperature, top-k, top-p)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(7))
    reference = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p is not None:
        reference = TopPLogitsWarper(top_p)(None, reference)
    ours = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    assert (ours.isfinite().sum(-1) < 1000).all() or (top_k is None and top_p is None)
    assert torch.allclose(ours.softmax(-1), reference.softmax(-1), atol=1e-6)


def test_overlong_prompt_is_truncated_with_a_warning(models):
    ours, _ = models  # context 97
    long_prompt = list(range(100, 250))
    with pytest.warns(UserWarning) as caught:
        out = generate(ours, [long_prompt], 10)
    messages = [str(w.message) for w in caught]
    assert any("keeping its last 96" in m for m in messages) and any("room for 1 new tokens" in m for m in messages)
    assert out[0][:96] == long_prompt[-96:] and len(out[0]) == 97


def test_bf16_weights_stay_within_bf16_rounding_and_the_cli_uses_them(models, small_hf, capsys):
    """bf16 weights (--bf16): logits within 2% of fp32 (relative norm; bf16 keeps 8 bits of mantissa)."""
    from tests.helpers import cli

    ours, _ = models
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        exact = ours(ids).float()
        bf16 = load_pretrained(small_hf[0]).eval().to(torch.bfloat16)
        approx = bf16(ids).float()
    assert ((approx - exact).norm() / exact.norm()).item() < 2e-2
    tokens = generate(bf16, [PROMPTS[0]], max_new_tokens=5)[0]
    assert len(tokens) == len(PROMPTS[0]) + 5 and next(bf16.parameters()).dtype == torch.bfloat16
    code, printed, err = cli(capsys, "generate", "--model", str(small_hf[0]), "--prompt", "Hello", "--max-new-tokens", "4", "--bf16")
    assert code == 0 and printed.strip(), err


def test_kv_cache_takes_the_dtype_of_the_keys_under_autocast(models, monkeypatch):
    """fp32 weights under bf16 autocast (as training's sample generation runs): the cache holds bf16
    keys and values, not fp32 copies of them."""
    from finetune.model.gpt import KVCache

    ours, _ = models
    stored = []
    original = KVCache.update

    def update(self, layer, k, v):
        result = original(self, layer, k, v)
        stored.append((k.dtype, self.k.dtype, self.v.dtype))
        return result

    monkeypatch.setattr(KVCache, "update", update)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(ours, PROMPTS, 3)
    assert stored and set(stored) == {(torch.bfloat16,) * 3}
    assert next(ours.parameters()).dtype == torch.float32


@pytest.mark.parametrize("block", [1, 3, 64, 1024])
def test_sample_draws_each_token_at_its_probability_and_never_a_zero_one(block):
    """Frequencies over 200,000 draws equal the probabilities within 5 standard errors, for any block size
    (one token per block, blocks split across the vocabulary, everything in one block); tokens a filter
    removed (probability 0), a block with no mass at all and the end of the vocabulary are never drawn."""
    from finetune.inference.generate import sample

    torch.manual_seed(0)
    probs = torch.randn(1000).mul(2).softmax(-1)
    probs[::7] = 0.0
    probs[192:256] = 0.0  # a whole block of 64 without mass
    probs[-1] = 0.0
    probs /= probs.sum()
    draws = sample(probs.repeat(200_000, 1), torch.Generator().manual_seed(1), block=block)
    seen = torch.bincount(draws, minlength=1000).double() / len(draws)
    assert seen[probs == 0].sum() == 0
    p = probs.double()
    assert ((seen - p).abs() <= 5 * (p * (1 - p) / len(draws)).sqrt() + 1e-12).all()


def test_sample_is_repeatable_from_a_seed_and_batched_rows_are_independent():
    from finetune.inference.generate import sample

    probs = torch.full((4, 50257), 1 / 50257)
    a = sample(probs, torch.Generator().manual_seed(5))
    b = sample(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(set(a.tolist())) == 4


def test_a_stop_string_ends_its_row_where_the_string_is_complete(models):
    """A row stops after the token that completes a stop string (then end-of-text), whatever the tokens it spans;
    a row whose text never holds it runs on as without stop strings."""
    from finetune.model.tokenizer import EOT_ID, get_tokenizer

    ours, _ = models
    decode = get_tokenizer().decode
    prompts = [[464, 3290, 318], [40, 588]]
    free = [row[len(p):] for row, p in zip(generate(ours, prompts, 24, eos_id=EOT_ID), prompts)]
    k = next(k for k in range(4, 20) if decode(free[0][k:k + 2]).strip().isascii() and decode(free[0][k:k + 2]).strip())
    stop = decode(free[0][k:k + 2]).strip()[-3:]  # may end inside a token, and spans two at most
    assert stop not in decode(free[1])
    ended = next(n for n in range(1, 25) if stop in decode(free[0][:n]))
    stopped = [row[len(p):] for row, p in zip(generate(ours, prompts, 24, eos_id=EOT_ID, stop=[stop]), prompts)]
    assert stopped[0][:ended] == free[0][:ended] and set(stopped[0][ended:]) <= {EOT_ID}
    assert stopped[1] == free[1][: len(stopped[1])] and len(stopped[1]) == len(free[1])
