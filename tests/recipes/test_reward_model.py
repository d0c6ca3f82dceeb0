"""Reward models from preference pairs: the Bradley-Terry loss and pairwise metrics against an independent
computation, better than chance on held-out pairs, and used everywhere a reward model is used (classify,
predict, score, serve, the transformers export and its pipeline, GRPO)."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from finetune.cli import main
from finetune.config import load_config
from finetune.data.prompts import format_prompt
from finetune.inference.loading import load_classifier
from finetune.inference.predict import exchanges, predict
from finetune.recipes.reward_model import RECIPE
from finetune.recipes.rewards import Rewards, RewardSpec
from tests.helpers import cli, one_line_error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "run"
    assert main(["run", "reward", "--quiet", "--config", "reward_tiny", f"output_dir={out}", "train.epochs=2"]) == 0
    return out


def held_out(run, split="test"):
    return RECIPE.prepare(load_config(RECIPE.Config, run / "config.yaml"))[split]


def rewards_of(loaded, pairs, side):
    texts = exchanges(loaded.meta, [p.record.instruction for p in pairs], [p.record.input for p in pairs],
                      [getattr(p, side) for p in pairs])
    return predict(loaded.classifier_model, loaded.meta, texts).values[:, 0]


def test_metrics_equal_the_bradley_terry_loss_of_each_pair_scored_alone(run):
    """Each response scored on its own (predict, one text at a time in its own batch shape) gives the run's
    loss, accuracy and margin on the test split."""
    pairs = held_out(run)
    loaded = load_classifier(str(run))
    chosen, rejected = rewards_of(loaded, pairs, "chosen"), rewards_of(loaded, pairs, "rejected")
    ours = json.loads((run / "metrics.json").read_text())["test"]
    assert ours["n"] == len(pairs)
    assert ours["loss"] == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), abs=1e-5)
    assert ours["accuracy"] == pytest.approx((chosen > rejected).double().mean().item(), abs=1e-12)
    assert ours["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert ours["reward_chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)


def test_chosen_scores_above_rejected_on_held_out_pairs_more_often_than_chance(run):
    test = json.loads((run / "metrics.json").read_text())["test"]
    # 110 held-out pairs: 70% or more has a chance of about 1e-5 under coin flips
    assert test["n"] >= 100 and test["accuracy"] >= 0.7, test


def test_the_text_scored_is_the_prompt_in_the_models_style_then_the_response(run):
    meta = load_classifier(str(run)).meta
    assert meta["problem_type"] == "reward" and meta["prompt_style"] == "alpaca" and meta["labels"] == ["reward"]
    assert exchanges(meta, ["Say hi."], [""], ["Hi."]) == [format_prompt("alpaca", "Say hi.") + "Hi."]


def test_classify_predict_score_and_serve_give_the_same_rewards(run, tmp_path, capsys):
    from tests.recipes.test_multilabel_regression import served

    pairs = held_out(run)[:5]
    loaded = load_classifier(str(run))
    chosen, rejected = rewards_of(loaded, pairs, "chosen"), rewards_of(loaded, pairs, "rejected")
    argv = ["classify", str(run)]
    for p in pairs:
        argv += ["--text", p.record.instruction, "--response", p.chosen]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    printed = out.splitlines()
    # classify asks with the instruction alone (no input): the same texts, scored as one batch as classify does
    # (a batch of other lengths pads differently and moves a reward by float rounding: 2.5e-6 on an AVX2 CPU)
    asked = exchanges(loaded.meta, [p.record.instruction for p in pairs], [""] * len(pairs), [p.chosen for p in pairs])
    expected = predict(loaded.classifier_model, loaded.meta, asked).values[:, 0]
    assert len(printed) == len(pairs)
    for line, p, value in zip(printed, pairs, expected, strict=True):
        score, instruction, response = line.split("\t")
        assert instruction == p.record.instruction and response == p.chosen
        assert float(score) == pytest.approx(value.item(), rel=1e-5)  # printed to 6 significant digits
    rows = [{"instruction": p.record.instruction, "input": p.record.input, "output": p.chosen, "response": p.rejected}
            for p in pairs]
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", str(run), "--data", str(responses), "--out", str(tmp_path / "rewards.csv")]) == 0
    frame = pd.read_csv(tmp_path / "rewards.csv", keep_default_na=False)
    assert list(frame.columns) == ["instruction", "response", "input", "reward"]
    assert frame["reward"].tolist() == pytest.approx(rejected.tolist(), abs=1e-6)
    assert main(["score", str(responses), "--reward-model", str(run)]) == 0
    scores = json.loads((tmp_path / "responses.scores.json").read_text())
    assert scores["reward"] == pytest.approx(rejected.mean().item(), abs=1e-6)
    assert scores["reward_reference"] == pytest.approx(chosen.mean().item(), abs=1e-6)
    assert scores["reward_win_rate"] == pytest.approx((rejected > chosen).double().mean().item())
    assert [e["reward"] for e in scores["per_example"]] == pytest.approx(rejected.tolist(), abs=1e-6)
    objects = [{"instruction": p.record.instruction, "input": p.record.input, "response": p.chosen} for p in pairs]
    answers, card = served(loaded, objects)
    assert card["problem_type"] == "reward" and card["prompt_style"] == "alpaca"
    assert [a["reward"] for a in answers] == pytest.approx(chosen.tolist(), abs=1e-6)


def test_transformers_export_scores_as_we_do_and_reads_back_as_a_reward_model(run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    pairs = held_out(run)[:6]
    loaded = load_classifier(str(run))
    ours = rewards_of(loaded, pairs, "chosen")
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["problem_type"] == "regression" and list(config["id2label"].values()) == ["reward"]
    texts = exchanges(loaded.meta, [p.record.instruction for p in pairs], [p.record.input for p in pairs],
                      [p.chosen for p in pairs])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        theirs = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)
    scored = pipeline("text-classification", model=str(tmp_path / "hf"))(texts)
    assert [s["score"] for s in scored] == pytest.approx(ours.tolist(), abs=1e-5)  # regression: no function applied
    back = load_classifier(str(tmp_path / "hf"))
    assert back.meta["problem_type"] == "reward" and back.meta["prompt_style"] == "alpaca"
    assert rewards_of(back, pairs, "chosen").tolist() == pytest.approx(ours.tolist(), abs=1e-5)


def test_a_reward_model_is_a_grpo_reward(run, tmp_path, capsys):
    from tests.recipes.test_grpo import arithmetic_file, grpo_args

    rewards = Rewards([RewardSpec(kind="reward_model", model=str(run))], [], "alpaca")
    prompts = [format_prompt("alpaca", "What is 2 + 3?")] * 2
    found = rewards.score(prompts, ["5", "I will not tell you."], [[20], [40]], [{"columns": {}, "where": "x"}] * 2)
    loaded = load_classifier(str(run))
    expected = predict(loaded.classifier_model, loaded.meta, [p + c for p, c in zip(prompts, ["5", "I will not tell you."])])
    assert found[:, 0].tolist() == pytest.approx(expected.values[:, 0].tolist(), abs=1e-9)
    out = tmp_path / "grpo"
    data = arithmetic_file(tmp_path / "arith.jsonl", 16)
    code, _, err = cli(capsys, *grpo_args(out, data, "data.prompt_style=alpaca",
                                          f'grpo.rewards=[{{kind: reward_model, model: "{run}"}}]'))
    assert code == 0, err
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r["rewards/reward_model/mean"] for r in train if r["split"] == "train"]
    assert scores and len(set(scores)) > 1  # the reward model's scores of real replies
    line = one_line_error(capsys, *grpo_args(tmp_path / "phi3", data, f'grpo.rewards=[{{kind: reward_model, model: "{run}"}}]'))
    assert "reads prompts in the 'alpaca' style and this run asks in 'phi3'" in line


def test_a_lora_reward_model_exports_to_peft_and_reads_back_as_one(tmp_path):
    out = tmp_path / "lora"
    assert main(["run", "reward", "--quiet", "--config", "reward_tiny", f"output_dir={out}", "train.epochs=1",
                 "finetune.trainable=lora", "lora.rank=4", "train.lr=3e-3"]) == 0
    pairs = held_out(out)[:6]
    loaded = load_classifier(str(out))
    assert main(["export", str(out), str(tmp_path / "peft"), "--format", "peft"]) == 0
    back = load_classifier(str(tmp_path / "peft"))
    assert back.meta["problem_type"] == "reward" and back.meta["prompt_style"] == "alpaca"
    assert rewards_of(back, pairs, "chosen").tolist() == pytest.approx(rewards_of(loaded, pairs, "chosen").tolist(), abs=1e-5)


def test_the_feature_cache_gives_the_metrics_of_an_uncached_run(tmp_path, capsys):
    """A frozen trunk (last block and head trained, dropout 0): both sides of every pair read from features
    computed once."""
    metrics = {}
    for cache in (True, False):
        out = tmp_path / str(cache)
        code, _, err = cli(capsys, "run", "reward", "--config", "reward_tiny", f"output_dir={out}", "train.epochs=1",
                           "finetune.trainable=last_block", f"train.cache_features={str(cache).lower()}")
        assert code == 0, err
        assert ("feature cache: blocks 0-0 are frozen" in err) == cache
        metrics[cache] = json.loads((out / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        for key in ("loss", "margin"):  # not the rewards' level: the loss is blind to a shift, which Adam lets drift
            assert metrics[True][split][key] == pytest.approx(metrics[False][split][key], rel=1e-4, abs=1e-5), (split, key)
        # rounding differs in the last bits between the two paths, so a pair scored within ~1e-6 of a tie may
        # flip: at most a few of the 935 training pairs
        assert metrics[True][split]["accuracy"] == pytest.approx(metrics[False][split]["accuracy"], abs=0.005), split
