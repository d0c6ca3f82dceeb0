"""Packing: records laid end to end give each record the logits and the loss it gets alone (positions
restart, attention stays inside the record), so a packed run trains on the same loss per target."""

import json

import pytest
import torch

from finetune import GPT, GPTConfig
from finetune.data.packing import pack, packed_batch
from finetune.model.losses import IGNORE, next_token_loss
from finetune.recipes.instruct import RECIPE, Collate, InstructConfig, PackedCollate, encode, packed
from tests.helpers import cli


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("gpt2-tiny")).eval()


def test_pack_puts_every_sequence_in_one_row_within_capacity():
    lengths = [7, 3, 9, 1, 4, 10, 2, 6]
    rows = pack(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 4  # 42 tokens in rows of 12: 4 is the fewest possible
    with pytest.raises(ValueError, match="more than a row"):
        pack([13], 12)


def test_a_packed_row_gives_each_sequence_its_own_logits():
    model = tiny_model()
    torch.manual_seed(1)
    sequences = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 9, 3, 11)]
    rows = [[(s, s) for s in sequences[:3]], [(sequences[3], sequences[3])]]  # the second row padded
    batch = packed_batch(rows)
    assert batch["positions"][0].tolist() == [*range(5), *range(9), *range(3)]
    assert batch["segments"][1].tolist() == [1] * 11 + [0] * 6
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"])
        starts = {0: [0, 5, 14], 1: [0]}
        for r, row in enumerate(rows):
            for (inputs, _), start in zip(row, starts[r]):
                alone = model(torch.tensor([inputs]))[0]
                torch.testing.assert_close(logits[r, start : start + len(inputs)], alone, atol=1e-5, rtol=1e-5)
    planted = packed_batch(rows)
    planted["positions"] = torch.arange(planted["input_ids"].shape[1]).expand_as(planted["input_ids"])
    with torch.no_grad():  # positions running on across the row (a common packing bug) change the logits
        wrong = model(planted["input_ids"], positions=planted["positions"], segments=planted["segments"])
    assert (wrong[0, 5:14] - logits[0, 5:14]).abs().max() > 1e-3


def instruct_examples(n=40, mask_prompt=False):
    config = InstructConfig(**{"data": {"mask_prompt": mask_prompt}})
    records = RECIPE.prepare(config)["train"][:n]
    return encode(records, "alpaca")


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_packed_batches_give_every_records_loss_and_the_same_loss_per_target(mask_prompt):
    model = tiny_model(3)
    examples = instruct_examples(mask_prompt=mask_prompt)
    plain, packing = Collate(256, mask_prompt), PackedCollate(Collate(256, mask_prompt))
    with torch.no_grad():
        alone = []
        for e in examples:
            b = plain([e])
            alone.append(next_token_loss(model, b["input_ids"], b["targets"]).item())
        rows = packed(examples, 256)
        assert len(rows) < len(examples) / 2  # really packed
        total, count = 0.0, 0
        for row in rows:
            b = packing([row])
            total += next_token_loss(model, b["input_ids"], b["targets"], b["positions"], b["segments"]).item()
            count += b["count"]
            hidden = model(b["input_ids"], positions=b["positions"], segments=b["segments"], return_hidden=True)
            for k, e in enumerate(row, start=1):  # each record's loss read from its own segment
                keep = (b["segments"][0] == k) & (b["targets"][0] != IGNORE)
                logits = model.lm_head(hidden[0, keep])
                own = torch.nn.functional.cross_entropy(logits, b["targets"][0, keep], reduction="sum").item()
                assert own == pytest.approx(alone[examples.index(e)], abs=1e-4, rel=1e-5)
    assert count == sum(plain([e])["count"] for e in examples)
    assert total / count == pytest.approx(sum(alone) / count, rel=1e-5)


def test_a_packed_run_sees_the_same_validation_loss_and_packs_its_rows(tmp_path, capsys):
    """The same start evaluated before training: packed (one record per row) and plain validation agree."""
    from finetune.datasets import INSTRUCTIONS, bundled

    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(json.loads(bundled(INSTRUCTIONS).read_text())[:80]))
    losses = {}
    for packing in (False, True):
        out = tmp_path / str(packing)
        code, _, err = cli(capsys, "run", "instruct", "--config", "instruct_tiny", f"output_dir={out}", f"data.path={data}",
                           f"data.packing={str(packing).lower()}", "train.epochs=1", "train.eval_at_start=true",
                           "data.max_length=256")
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [r["loss"] for r in rows if r["split"] == "val"]
        if packing:
            assert "records packed in" in err
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)


@pytest.mark.parametrize("mean", [False, True])
def test_packed_preference_pairs_give_each_response_its_own_log_probability(mean):
    """Pairs kept whole, several per row; a pair too long for a row gets a row per response."""
    from finetune.model.losses import sequence_logprobs
    from finetune.recipes.dpo import RECIPE as DPO
    from finetune.recipes.dpo import DPOConfig
    from finetune.recipes.preference_pairs import Collate as PairCollate
    from finetune.recipes.preference_pairs import PackedCollate as PackedPairs
    from finetune.recipes.preference_pairs import encode_pairs, packed_pairs

    from dataclasses import replace

    model = tiny_model(4)
    max_length = 256  # gpt2-tiny's context
    records = DPO.prepare(DPOConfig())["train"][:24]
    records[0] = replace(records[0], chosen=records[0].chosen + " and so on" * 80)  # a pair longer than a row
    pairs = encode_pairs(records, "alpaca", max_length)
    items = [(e, None) for e in pairs]
    packs = packed_pairs(items, max_length)
    assert len(packs) < len(items) and any(len(p) >= 2 for p in packs)  # several pairs share rows
    with torch.no_grad():
        batch = PairCollate(max_length)(items)
        alone = sequence_logprobs(model, batch["input_ids"], batch["targets"], mean)
        expected = {id(e): (alone[i].item(), alone[len(items) + i].item()) for i, (e, _) in enumerate(items)}
        batch = PackedPairs(max_length)(packs)
        assert batch["count"] == len(items)
        split = [p for p in packs if len(p) == 1 and len(p[0][0].chosen) + len(p[0][0].rejected) - 2 > max_length]
        assert split  # the path that gives one pair two rows is exercised
        found = sequence_logprobs(model, batch["input_ids"], batch["targets"], mean, packed=batch)
        order = [e for group in packs for e, _ in group]
        for i, e in enumerate(order):
            assert found[i].item() == pytest.approx(expected[id(e)][0], abs=1e-4)
            assert found[len(order) + i].item() == pytest.approx(expected[id(e)][1], abs=1e-4)
        counts = PairCollate(max_length)([(e, None) for e in order])["target_counts"]
        assert batch["target_counts"].tolist() == counts.tolist()


def test_a_packed_dpo_run_sees_the_same_validation_metrics(tmp_path, capsys):
    from finetune.datasets import PREFERENCES, bundled

    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(json.loads(bundled(PREFERENCES).read_text())[:80]))
    losses = {}
    for packing in (False, True):
        out = tmp_path / str(packing)
        code, _, err = cli(capsys, "run", "dpo", "--config", "dpo_tiny", f"output_dir={out}", f"data.path={data}",
                           f"data.packing={str(packing).lower()}", "data.max_length=256")
        assert code == 0, err
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [r for r in rows if r["split"] == "val"][0]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert losses[True][key] == pytest.approx(losses[False][key], rel=1e-5, abs=1e-6), key
