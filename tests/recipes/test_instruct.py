"""Instruction tuning: collate masks, data errors, a tiny end-to-end run, response scoring."""

import json

import pytest
import torch
from finetune.datasets import INSTRUCTIONS, bundled
from finetune.recipes.instruct import Collate, Example, InstructData, read_instructions
from rouge_score import rouge_scorer
from safetensors.torch import load_file

from finetune import load_pretrained
from finetune.errors import UserError
from finetune.data.prompts import format_prompt
from finetune.data.records import Record, read_records, split_records
from finetune.model.tokenizer import EOT_ID
from finetune.formats.loading import build_model, load_model
from tests.helpers import assert_same_files, cli, one_line_error, run_killed_and_resumed

I = -100


def test_collate_pads_keeps_one_end_of_text_and_masks():
    batch = [Example([1, 2, 3, 4, 5], prompt_length=3), Example([6, 7], prompt_length=1)]
    out = Collate()(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, EOT_ID, EOT_ID, EOT_ID]]
    assert out["targets"].tolist() == [[2, 3, 4, 5, EOT_ID], [7, EOT_ID, I, I, I]]

    masked = Collate(mask_prompt=True)(batch)
    assert masked["input_ids"].tolist() == out["input_ids"].tolist()
    assert masked["targets"].tolist() == [[I, I, 4, 5, EOT_ID], [7, EOT_ID, I, I, I]]

    cut = Collate(max_length=3, mask_prompt=True)(batch)
    assert cut["input_ids"].tolist() == [[1, 2, 3], [6, 7, EOT_ID]]
    assert cut["targets"].tolist() == [[I, I, 4], [7, EOT_ID, I]]


def test_template_and_book_split():
    record = Record("Rewrite the sentence.", "The car is fast.", "It zooms.")
    assert format_prompt("alpaca", record.instruction, record.input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe car is fast.\n\n### Response:\n")
    assert "### Input" not in format_prompt("alpaca", "Say hi.")
    splits = split_records(read_instructions(InstructData()), 0.85, 0.10)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "test": 110, "val": 55}


def test_jsonl_and_mapped_field_names(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Say hi.", "answer": "Hi."}\n\n{"prompt": "Add.", "context": "1+1", "answer": "2"}\n')
    fields = InstructData(path=str(path), instruction_field="prompt", input_field="context", output_field="answer")
    assert read_instructions(fields) == [Record("Say hi.", "", "Hi."), Record("Add.", "1+1", "2")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', r"bad.json:2:\d+: malformed JSON"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', r"bad.jsonl:2:2: malformed JSON"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]', r"missing.json: record 2: missing 'instruction'"),
    ("empty.json", "", r"empty.json: empty file"),
    ("object.json", '{"instruction": "a"}', r"object.json: expected a JSON list"),
])
def test_bad_data_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_records(path)


def tiny_instruct_args(out, *extra):
    return ["run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={out}",
            "train.epochs=1", "train.eval_every=0", "generation.max_new_tokens=4", *extra]


@pytest.fixture
def small_data(tmp_path):
    records = json.loads(bundled(INSTRUCTIONS).read_text())[:60]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records))
    return path


def test_tiny_run_end_to_end(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *tiny_instruct_args(out, f"data.path={small_data}"))
    assert code == 0, err
    assert "training on" in err and "target tokens" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["split"] == "val"]
    assert rows[0]["step"] == 0 and len(val) == 2 and val[-1] < val[0]  # evaluated before and after training
    responses = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 and all(set(r) == {"instruction", "input", "output", "response", "prompt_style"} for r in responses)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"train", "val", "test", "responses"} <= set(metrics)
    assert metrics["test"]["perplexity"] == pytest.approx(2.718281828 ** metrics["test"]["loss"], rel=1e-5)
    assert {"rouge_l", "exact_match", "n"} <= set(metrics["responses"])
    report = (out / "report.md").read_text()
    assert report.startswith("# instruct: gpt2-tiny") and "## Results" in report and "## Sample responses" in report

    code, printed, _ = cli(capsys, "eval", str(out), "--json")
    assert code == 0 and json.loads(printed)["test"] == metrics["test"]
    code, printed, _ = cli(capsys, "respond", str(out), "--data", str(small_data), "--max-new-tokens", "2")
    assert code == 0 and len((out / "responses-instructions.jsonl").read_text().splitlines()) == 60
    code, _, err = cli(capsys, "generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "3")
    assert code == 0, err  # a run directory stands for the checkpoint it kept


def test_lora_instruct_run_prints_its_progress_and_trains_only_the_adapters(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    args = [a for a in tiny_instruct_args(out, f"data.path={small_data}", "finetune.trainable=lora", "lora.rank=4",
                                          "lora.alpha=8") if a != "--quiet"]
    code, printed, err = cli(capsys, *args)
    assert code == 0, err
    # Not --quiet: a sample response at each evaluation (step 0 and the end of the epoch) and the summary.
    sample = split_records(read_records(small_data), 0.85, 0.10)["val"][0].instruction
    assert err.count(f"sample response to {sample!r}: ") == 2, err
    assert "loss  perplexity" in printed and "test responses: ROUGE-L" in printed and "results in" in printed

    stored = load_file(out / "best" / "adapter.safetensors")
    targets = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    assert set(stored) == {f"blocks.{i}.{t}.lora_{m}" for i in range(2) for t in targets for m in "AB"}
    adapted, _ = load_model(out / "best")
    torch.manual_seed(123)  # the run's seed: the random-init base it adapted
    base = build_model("gpt2-tiny", "random")
    for name, p in adapted.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base.state_dict()[name.replace(".base", "")]), f"{name} changed"
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in stored.items() if n.endswith("lora_B"))

    assert cli(capsys, "merge", str(out), str(tmp_path / "merged"))[0] == 0
    merged = load_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (adapted.eval()(ids) - merged.eval()(ids)).abs().max().item() <= 1e-5
    code, _, err = cli(capsys, "generate", "--model", str(tmp_path / "merged"), "--prompt", "Hello", "--max-new-tokens", "3")
    assert code == 0, err


def test_interrupted_and_resumed_instruct_run_ends_the_same(tmp_path, small_data, capsys, monkeypatch):
    extra = (f"data.path={small_data}", "train.epochs=2", "model.dropout=0.1", "train.checkpoint_every=3")
    full, cut = run_killed_and_resumed(capsys, monkeypatch, lambda out: tiny_instruct_args(out, *extra), tmp_path,
                                       checkpoints_before_kill=2)  # step 6 of 7 in the first epoch
    assert_same_files(full, cut, ("best/model.safetensors", "checkpoints/step-0000014/model.safetensors"),
                      ("metrics.jsonl", "metrics.json", "responses.jsonl"))


def test_bad_inputs_exit_2(tmp_path, small_data, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"output": "c"}]')
    assert "record 2: missing 'instruction'" in one_line_error(capsys, *tiny_instruct_args(tmp_path / "o", f"data.path={bad}"))
    (tmp_path / "empty.json").write_text("")
    assert "empty file" in one_line_error(capsys, *tiny_instruct_args(tmp_path / "o", f"data.path={tmp_path / 'empty.json'}"))
    out = tmp_path / "run"
    assert cli(capsys, *tiny_instruct_args(out, f"data.path={small_data}"))[0] == 0
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "word " * 300, "input": "", "output": "x"}]))  # > 256-token context
    assert "does not fit the context" in one_line_error(capsys, "respond", str(out), "--data", str(long))


def write_responses(path, pairs):
    path.write_text("".join(json.dumps({"instruction": "Do it.", "input": "", "output": ref, "response": resp}) + "\n"
                            for ref, resp in pairs))
    return path


PAIRS = [("The car is as fast as lightning.", "The car is as quick as lightning."),
         ("Cumulonimbus clouds.", "cumulonimbus clouds"),
         ("Paris is the capital of France.", "The capital is Berlin, running fast.")]


def test_score_matches_rouge_score(tmp_path, capsys):
    path = write_responses(tmp_path / "responses.jsonl", PAIRS)
    code, printed, _ = cli(capsys, "score", str(path), "--json")
    summary = json.loads(printed)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(ref, resp)["rougeL"].fmeasure for ref, resp in PAIRS) / len(PAIRS)
    assert code == 0 and summary["n"] == 3
    assert summary["rouge_l"] == pytest.approx(expected, abs=1e-12)
    assert summary["exact_match"] == pytest.approx(1 / 3)  # case and final period do not count
    assert json.loads((tmp_path / "responses.scores.json").read_text())["per_example"][1]["exact_match"] == 1.0
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert "broken.jsonl:1: missing string field 'response'" in one_line_error(capsys, "score", str(tmp_path / "broken.jsonl"))
