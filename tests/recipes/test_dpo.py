"""Preference tuning with DPO: the loss and TRL's metrics against an independent computation, the
reference computed once and never held beside the policy, a LoRA start merged (so the reference is
the instruct model, not its bare base), kill and resume, and the offline preset moving the metrics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from finetune.datasets import PREFERENCES, bundled

from finetune.model.gpt import GPT
from finetune.data.prompts import format_prompt
from finetune.model.tokenizer import EOT_ID, get_tokenizer
from finetune.formats.loading import build_model, load_pretrained
from tests.helpers import assert_same_files, cli, one_line_error, run_killed_and_resumed

LN2 = math.log(2)


def preference_file(path, n=60, start=0):
    path.write_text(json.dumps(json.loads(bundled(PREFERENCES).read_text())[start:start + n]))
    return path


def dpo_args(out, data, *extra):
    return ["run", "dpo", "--quiet", "--config", "dpo_tiny", f"output_dir={out}", f"data.path={data}",
            "train.eval_every=3", "train.batch_size=4", "generation.max_new_tokens=4", *extra]


def independent_logps(model: GPT, records: list[dict], style: str, mean: bool) -> torch.Tensor:
    """(pairs, 2): each response's log-probability (and its end-of-text's) given the prompt, one plain
    forward pass per sequence, no padding, no batching."""
    tokenizer = get_tokenizer()
    out = []
    with torch.no_grad():
        for r in records:
            prompt = tokenizer.encode_ordinary(format_prompt(style, r["instruction"], r["input"]))
            row = []
            for response in (r["chosen"], r["rejected"]):
                ids = prompt + tokenizer.encode_ordinary(response) + [EOT_ID]
                logps = F.log_softmax(model.eval()(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
                picked = logps[torch.arange(len(prompt) - 1, len(ids) - 1), torch.tensor(ids[len(prompt):])]
                row.append(picked.mean() if mean else picked.sum())
            out.append(torch.stack(row))
    return torch.stack(out)


def formula(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    chosen, rejected = beta * (policy[:, 0] - reference[:, 0]), beta * (policy[:, 1] - reference[:, 1])
    margin = chosen - rejected
    return {"loss": float(-F.logsigmoid(margin).mean()), "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()), "rewards/margins": float(margin.mean()),
            "rewards/accuracies": float((margin > 0).double().mean()), "logps/chosen": float(policy[:, 0].mean()),
            "logps/rejected": float(policy[:, 1].mean())}


def val_records(data, n=60) -> list[dict]:
    records = json.loads(data.read_text())
    return records[int(n * 0.85) + int(n * 0.10):]  # the book's split: train, test, then validation


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_and_metrics_equal_the_formula_on_plain_forward_passes(tmp_path, capsys, reduction):
    data = preference_file(tmp_path / "prefs.json")
    out = tmp_path / "run"
    code, _, err = cli(capsys, *dpo_args(out, data, f"dpo.logprob_reduction={reduction}", "dpo.beta=0.5"))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["split"] == "val")
    assert first["step"] == 0 and abs(first["loss"] - LN2) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    train = [r for r in rows if r["split"] == "train"]
    assert all(k in train[0] for k in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"))

    torch.manual_seed(123)  # the start: gpt2-tiny's random init from the run's seed
    reference = independent_logps(build_model("gpt2-tiny", "random"), val_records(data), "alpaca", reduction == "mean")
    policy = independent_logps(load_pretrained(out), val_records(data), "alpaca", reduction == "mean")
    expected = formula(policy, reference, 0.5)
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    assert metrics["pairs"] == len(val_records(data))
    for name, value in expected.items():
        assert abs(metrics[name] - value) < 1e-5, (name, metrics[name], value)
    assert metrics["rewards/margins"] > 0.01  # the policy moved: the comparison above is not of two ln 2s


def test_the_reference_is_computed_once_and_a_resume_reuses_it(tmp_path, capsys, monkeypatch):
    """Forward passes through the reference computation: one per batch of each split, on a fresh run;
    none on a resumed one. Killed and resumed, the run ends bit-identical."""
    import finetune.recipes.dpo as dpo

    data = preference_file(tmp_path / "prefs.json")
    passes, original = [], dpo.reference_logps

    def counted(model, encoded, *args, **kwargs):
        forward = model.forward
        calls = [0]

        def counting(*a, **k):
            calls[0] += 1
            return forward(*a, **k)

        monkeypatch.setattr(model, "forward", counting)
        try:
            return original(model, encoded, *args, **kwargs)
        finally:
            monkeypatch.delattr(model, "forward")
            passes.append((len(encoded), calls[0]))

    monkeypatch.setattr(dpo, "reference_logps", counted)
    full, cut = run_killed_and_resumed(capsys, monkeypatch, lambda out: dpo_args(out, data, "train.checkpoint_every=4"),
                                       tmp_path, checkpoints_before_kill=2)
    # 51 train, 6 test, 3 val pairs in batches of 4: 13 + 1 + 2 passes, for the full run and the cut one; none on resume.
    assert passes == [(51, 13), (3, 1), (6, 2)] * 2
    assert_same_files(full / "best", cut / "best", ("model.safetensors",), ("config.json",))
    assert_same_files(full, cut, ("reference_logps.safetensors",), ("metrics.jsonl", "metrics.json", "responses.jsonl"))


def test_a_lora_start_is_merged_so_the_reference_is_the_instruct_model(tmp_path, capsys):
    """DPO with LoRA from an instruct run trained with LoRA: the reference log-probabilities are the
    instruct model's (its adapter folded in), not its bare base's, and the DPO checkpoint loads as the
    instruct model plus the new adapter."""
    data = preference_file(tmp_path / "prefs.json")
    instruct = tmp_path / "instruct"
    code, _, err = cli(capsys, "run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={instruct}",
                       f"data.path={data}", "finetune.trainable=lora", "train.epochs=1", "train.eval_every=0",
                       "train.lr=5e-3", "generation.max_new_tokens=4")
    assert code == 0, err
    out = tmp_path / "dpo"
    code, _, err = cli(capsys, *dpo_args(out, data, f"model.name={instruct}", "model.init=pretrained",
                                         "finetune.trainable=lora", "train.lr=5e-3"))
    assert code == 0, err
    assert json.loads((out / "best" / "adapter_config.json").read_text())["base"]["merged"] is True

    from safetensors.torch import load_file

    stored = load_file(out / "reference_logps.safetensors")["val"].double()
    records = val_records(data)
    instruct_model = load_pretrained(instruct)
    assert (stored - independent_logps(instruct_model, records, "alpaca", False)).abs().max() < 1e-4
    torch.manual_seed(123)
    bare = independent_logps(build_model("gpt2-tiny", "random"), records, "alpaca", False)
    assert (stored - bare).abs().max() > 1e-2  # what a reference silently left as the base would be

    policy = independent_logps(load_pretrained(out), records, "alpaca", False)
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    expected = formula(policy, independent_logps(instruct_model, records, "alpaca", False), 0.1)
    for name, value in expected.items():
        assert abs(metrics[name] - value) < 1e-4, (name, metrics[name], value)
    assert abs(metrics["rewards/margins"]) > 1e-3  # rewards moved off 0


def test_the_offline_preset_moves_the_metrics_the_right_way(tmp_path, capsys):
    """dpo_tiny (a random-init gpt2-tiny as its start) on the first 400 of the book's records: training
    loss below ln 2, validation accuracy above one half. The full preset is in the README."""
    data = preference_file(tmp_path / "prefs.json", n=400)
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "dpo", "--quiet", "--config", "dpo_tiny", f"output_dir={out}",
                       f"data.path={data}", "generation.max_new_tokens=4")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train, val = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]
    assert sum(r["loss"] for r in train[-10:]) / 10 < LN2
    assert val[0]["rewards/accuracies"] == 0.0 and val[-1]["rewards/accuracies"] > 0.5
    assert (out / "curves.png").stat().st_size > 0 and (out / "responses.jsonl").exists()


BAD = [
    ("no-rejected", [{"instruction": "a", "chosen": "b"}], [], "record 1: missing 'rejected'"),
    ("empty-chosen", [{"instruction": "a", "chosen": " ", "rejected": "c"}], [], "record 1: empty 'chosen'"),
    ("beta", None, ["dpo.beta=0"], "dpo.beta"),
    ("no-room", [{"instruction": "word " * 40, "chosen": "b", "rejected": "c"}], ["data.max_length=30"],
     "leaving no room for a response in 30"),
    ("reduction", None, ["dpo.logprob_reduction=max"], "dpo.logprob_reduction"),
]


@pytest.mark.parametrize("case, records, extra, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_preference_input_is_one_line(tmp_path, capsys, case, records, extra, expected):
    data = tmp_path / "prefs.json"
    if records is None:
        preference_file(data)
    else:
        rows = [dict(r, instruction=f"{r['instruction']} {i}") for i, r in enumerate(records * (20 // len(records)))]
        data.write_text(json.dumps(rows))
    line = one_line_error(capsys, *dpo_args(tmp_path / "out", data, *extra))
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_identical_responses_are_counted_in_a_warning(tmp_path, capsys):
    records = json.loads(bundled(PREFERENCES).read_text())[:40]
    records[3]["rejected"] = records[3]["chosen"]
    (tmp_path / "prefs.json").write_text(json.dumps(records))
    code, _, err = cli(capsys, *dpo_args(tmp_path / "out", tmp_path / "prefs.json", "train.eval_every=0"))
    assert code == 0, err
    assert "1 record(s) with chosen equal to rejected, e.g." in err and "record 4" in err


def test_a_classifier_cannot_start_preference_tuning(tmp_path, capsys):
    from finetune.checkpoints.atomic import write_directory
    from finetune.model.classifier import GPTClassifier
    from finetune.model.gpt import GPTConfig
    from finetune.checkpoints.model_files import model_files

    write_directory(tmp_path / "clf", model_files(GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 2),
                                                  {"labels": ["a", "b"], "max_length": 8}))
    line = one_line_error(capsys, *dpo_args(tmp_path / "out", preference_file(tmp_path / "prefs.json"),
                                            f"model.name={tmp_path / 'clf'}", "model.init=pretrained"))
    assert "is a classifier; the dpo recipe trains a language model" in line
