"""Every kind of bad input ends in one line naming the culprit, exit status 2, and no lost work.

Each case runs against the output directory of a previous good run (with overwrite=true where a
run is asked for, the case where losing work would hurt most) and checks that not one of its files
changed.
"""

import hashlib
import json
import shutil

import pytest

from tests.helpers import one_line_error, small_spam_file, tiny_spam_args


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from finetune.cli import main

    root = tmp_path_factory.mktemp("good")
    data = small_spam_file(root / "sms.tsv")
    out = root / "run"
    assert main(tiny_spam_args(data, out, "train.epochs=1")) == 0
    return out, data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, by name."""
    root = tmp_path_factory.mktemp("bad")
    contents = {
        "notab.tsv": "ham\tfine\nspam no tab\n",
        "label.tsv": "ham\tfine\nham\tok\nSPAM\tshouting\n",
        "empty.tsv": "",
        "nomessage.tsv": "ham\thello\nspam\t   \n",
        "onespam.tsv": "ham\ta\nham\tb\nham\tc\nspam\td\n",
        "malformed.json": '[{"instruction": "a", "output": "b"},\n {"instruction": "c", output: "d"}]',
        "noinstruction.json": '[{"input": "x", "output": "y"}]',
        "empty.json": "",
        "object.json": '{"instruction": "a", "output": "b"}',
        "malformed.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": \n',
        "number.json": '[{"instruction": 42, "output": "b"}]',
        "broken.yaml": "recipe: spam\ntrain:\n  epochs: [1,\n",
        "instruct.yaml": "recipe: instruct\n",
        "unknownkey.yaml": "recipe: spam\nmodel:\n  name: gpt2-tiny\n  layers: 3\n",
        "responses.jsonl": '{"instruction": "a", "output": "b"}\n',
        "scored.jsonl": '{"instruction": "a", "output": "b", "response": "c"}\n',
        "noresponse.jsonl": '{"instruction": "a", "output": "b"}\n',
        "config.json": "{}",
    }
    tickets = "body,team\n" + "".join(f'"ticket {i}{team},\nline two",{team}\n' for i in range(4) for team in "abc")
    contents.update({
        "tickets.csv": tickets,
        "emptytext.csv": tickets + '"   ",a\n',
        "nolabel.csv": tickets + "text without a team,\n",
        "oneclass.csv": "body,team\n" + "".join(f"ticket {i},a\n" for i in range(9)),
        "malformed.csv": "body,team\nfine,a\ntoo,many,fields\n",
        "semicolons.csv": "body;team\nfine;a\nalso fine;b\n",
        "numbers.json": "[1, 2, 3]",
        "object_tickets.json": '{"body": "x", "team": "a"}',
        "train_ab.csv": "body,team\n" + "".join(f"t{i}{team},{team}\n" for i in range(3) for team in "ab"),
        "val_c.csv": "body,team\nfine,a\nnew team,c\n",
        "broken.parquet": "PAR1 this is not a parquet file",
        # multi-label and regression
        "tags_nolabels.jsonl": "".join(f'{{"text": "t{i}", "labels": []}}\n' for i in range(12)),
        "tags_comma.csv": "text,labels\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(12)),
        "tags_notjson.csv": "text,labels\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(12)),
        "tags_flag.csv": "text,a,b\n" + "".join(f"t{i},1,0\n" for i in range(5)) + "t5,yes please,0\n",
        "scores_text.csv": "text,score\n" + "".join(f"t{i},{i}\n" for i in range(5)) + "t5,high\n",
        "scores_inf.csv": "text,score\n" + "".join(f"t{i},{i}\n" for i in range(5)) + "t5,inf\n",
        "scores_missing.csv": "text,score\n" + "".join(f"t{i},{i}\n" for i in range(5)) + "t5,\n",
        "scores_constant.csv": "text,score\n" + "".join(f"t{i},3\n" for i in range(12)),
        "pairs_one_side.jsonl": '{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "d", "chosen": "e"}\n',
        # conversations
        "chats_tool.jsonl": '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                            '{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        "chats_none.jsonl": '{"messages": [{"role": "user", "content": "a"}]}\n',
        "chats_nocolumn.jsonl": '{"dialog": [{"role": "user", "content": "a"}]}\n',
        "template.jinja": "{% for message in messages %}{{ message.content }{% endfor %}",
    })
    for name, text in contents.items():
        (root / name).write_text(text)
    (root / "latin1.tsv").write_bytes(b"ham\tok\nspam\tcaf\xe9\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait, " * 50)
    (root / "nul.txt").write_bytes(b"text with\x00nul bytes " * 50)
    (root / "empty.txt").write_text("\n")
    (root / "short.txt").write_text("Too short for a window of 64 tokens. " * 3)
    (root / "nodocs").mkdir()
    (root / "latin1.csv").write_bytes(b"body,team\nok,a\ncaf\xe9,b\n")
    import pandas as pd
    pd.DataFrame({"body": ["x", "y", "z"], "team": ["a", None, "b"]}).to_parquet(root / "nanlabel.parquet")
    import torch

    from finetune import GPT, GPTConfig
    from finetune.checkpoints.atomic import write_directory
    from finetune.model.classifier import GPTClassifier
    from finetune.checkpoints.model_files import model_files

    torch.manual_seed(0)
    write_directory(root / "lm_ckpt", model_files(GPT(GPTConfig.from_preset("gpt2-tiny")), {}))
    corrupt = root / "corrupt_ckpt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}))
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    _peft_files(root)
    classifier = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 2, pool="last_position")
    write_directory(root / "last_position_ckpt", model_files(classifier, {"labels": ["a", "b"], "max_length": 8}))
    from finetune.model.lora import apply_lora

    head_only = apply_lora(GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 2), 4, 8, ["head"])
    write_directory(root / "head_lora_ckpt", model_files(head_only, {
        "labels": ["a", "b"], "max_length": 8, "base": {"name": str(root / "lm_ckpt"), "init": "pretrained", "seed": 0}}))
    reward_model = GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 1)
    write_directory(root / "reward_ckpt", model_files(reward_model, {
        "labels": ["reward"], "problem_type": "reward", "prompt_style": "alpaca", "max_length": 8, "keep": "start"}))
    (root / "norun").mkdir()
    (root / "norun" / "config.yaml").write_text("recipe: spam\n")
    return root


def _peft_files(root):
    """PEFT adapter directories, each wrong in one way, on the gpt2-tiny checkpoint lm_ckpt (64 wide)."""
    import torch
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
              "base_model_name_or_path": str(root / "lm_ckpt")}
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
    adapters = {
        "peft_noconfig": (None, {key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(192, 4)}),
        "peft_malformed": ("{broken", {key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(192, 4)}),
        "peft_dora": ({**config, "use_dora": True}, {}),
        "peft_wrong_base": (config, {key.format("A"): torch.zeros(4, 60), key.format("B"): torch.zeros(180, 4)}),
        "peft_target": (config, {"base_model.model.transformer.wte.lora_A.weight": torch.zeros(4, 50257),
                                 "base_model.model.transformer.wte.lora_B.weight": torch.zeros(64, 4)}),
    }
    for name, (adapter_config, tensors) in adapters.items():
        (root / name).mkdir()
        if adapter_config is not None:
            text = adapter_config if isinstance(adapter_config, str) else json.dumps(adapter_config)
            (root / name / "adapter_config.json").write_text(text)
        if tensors:
            save_file(tensors, str(root / name / "adapter_model.safetensors"))
    (root / "peft_pickle").mkdir()
    (root / "peft_pickle" / "adapter_config.json").write_text(json.dumps(config))
    torch.save({key.format("A"): torch.zeros(4, 64)}, root / "peft_pickle" / "adapter_model.bin")


def spam(out, data, *extra):
    return tiny_spam_args(data, out, "overwrite=true", *extra)


def classification(out, data, *extra):
    return ["run", "classification", "--quiet", "--config", "classification_tiny", f"output_dir={out}",
            "overwrite=true", f"data.path={data}", "data.text_field=body", "data.label_field=team", *extra]


def instruct(out, data):
    return ["run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={out}",
            "overwrite=true", f"data.path={data}"]


def chat(out, *extra):
    return ["run", "chat", "--quiet", "--config", "chat_tiny", f"output_dir={out}", "overwrite=true", *extra]


def grpo(out, *extra):
    """A GRPO run from a random gpt2-tiny on the bundled arithmetic prompts, with `extra` on top."""
    return ["run", "grpo", "--quiet", "--config", "grpo_tiny", f"output_dir={out}", "overwrite=true",
            "model.name=gpt2-tiny", "model.init=random", "data.prompt_style=phi3", *extra]


def multilabel(out, data, *extra):
    return ["run", "multilabel", "--quiet", "--config", "multilabel_tiny", f"output_dir={out}", "overwrite=true",
            f"data.path={data}", *extra]


def regression(out, data, *extra):
    return ["run", "regression", "--quiet", "--config", "regression_tiny", f"output_dir={out}", "overwrite=true",
            f"data.path={data}", "data.text_field=text", "data.target_fields=[score]", *extra]


def reward(out, *extra):
    return ["run", "reward", "--quiet", "--config", "reward_tiny", f"output_dir={out}", "overwrite=true", *extra]


def text(out, data, *extra):
    return ["run", "text", "--quiet", "--config", "text_tiny", f"output_dir={out}", "overwrite=true",
            f"data.path={data}", f"data.cache_dir={out.parent / 'token-cache'}", *extra]


# (case id, argv built from (good run dir, good data file, bad files dir), text the one line must contain)
CASES = [
    # data
    ("tsv-no-tab", lambda o, d, f: spam(o, f / "notab.tsv"), "notab.tsv:2: no tab"),
    ("tsv-unknown-label", lambda o, d, f: spam(o, f / "label.tsv"), "label.tsv:3: unknown label 'SPAM'"),
    ("tsv-empty", lambda o, d, f: spam(o, f / "empty.tsv"), "empty.tsv: no records"),
    ("tsv-not-utf8", lambda o, d, f: spam(o, f / "latin1.tsv"), "latin1.tsv:2: not UTF-8"),
    ("tsv-empty-message", lambda o, d, f: spam(o, f / "nomessage.tsv"), "nomessage.tsv:2: empty text"),
    ("tsv-missing", lambda o, d, f: spam(o, f / "nothere.tsv"), "nothere.tsv: cannot read data file"),
    ("tsv-too-few-of-a-label", lambda o, d, f: spam(o, f / "onespam.tsv"), "onespam.tsv: fewer than 3 examples of class 'spam'"),
    ("json-malformed", lambda o, d, f: instruct(o, f / "malformed.json"), "malformed.json:2:23: malformed JSON"),
    ("json-missing-instruction", lambda o, d, f: instruct(o, f / "noinstruction.json"), "record 1: missing 'instruction'"),
    ("json-empty", lambda o, d, f: instruct(o, f / "empty.json"), "empty.json: empty file"),
    ("json-not-a-list", lambda o, d, f: instruct(o, f / "object.json"), "object.json: expected a JSON list"),
    ("jsonl-malformed-line", lambda o, d, f: instruct(o, f / "malformed.jsonl"), "malformed.jsonl:2:"),
    ("json-wrong-type", lambda o, d, f: instruct(o, f / "number.json"), "'instruction' must be a string"),
    ("table-missing-column", lambda o, d, f: classification(o, f / "tickets.csv", "data.text_field=message"),
     "tickets.csv: no column 'message' (columns: body, team); set data.text_field"),
    ("table-empty-text", lambda o, d, f: classification(o, f / "emptytext.csv"), "emptytext.csv: row 13: empty text in column 'body'"),
    ("table-missing-label", lambda o, d, f: classification(o, f / "nolabel.csv"), "nolabel.csv: row 13: missing label"),
    ("table-nan-label", lambda o, d, f: classification(o, f / "nanlabel.parquet"), "nanlabel.parquet: row 2: missing label"),
    ("table-unseen-label", lambda o, d, f: classification(o, "null", f"data.train_path={f / 'train_ab.csv'}",
                                                          f"data.val_path={f / 'val_c.csv'}"),
     "val_c.csv: row 2: unknown label 'c' (classes: a, b); the training data never has it"),
    ("table-one-class", lambda o, d, f: classification(o, f / "oneclass.csv"), "oneclass.csv: only one class ('a')"),
    ("table-labels-miss-one", lambda o, d, f: classification(o, f / "tickets.csv", "data.labels=[a, b]"),
     "tickets.csv: row 3: unknown label 'c' (classes: a, b); add it to data.labels"),
    ("table-malformed-csv", lambda o, d, f: classification(o, f / "malformed.csv"), "malformed.csv: malformed CSV (Expected 2 fields in line 3, saw 3)"),
    ("table-wrong-delimiter", lambda o, d, f: classification(o, f / "semicolons.csv"), "semicolons.csv: no column 'body'; one column found with delimiter ','"),
    ("table-not-utf8", lambda o, d, f: classification(o, f / "latin1.csv"), "latin1.csv:3: not UTF-8"),
    ("table-broken-parquet", lambda o, d, f: classification(o, f / "broken.parquet"), "broken.parquet: cannot read as Parquet"),
    ("table-json-not-objects", lambda o, d, f: classification(o, f / "numbers.json"), "numbers.json: record 1: expected a JSON object"),
    ("table-json-not-a-list", lambda o, d, f: classification(o, f / "object_tickets.json"), "object_tickets.json: expected a JSON list of objects"),
    ("table-unknown-extension", lambda o, d, f: classification(o, f / "config.json.bak"), "cannot tell the format"),
    ("table-both-sources", lambda o, d, f: classification(o, f / "tickets.csv", f"data.train_path={f / 'tickets.csv'}"),
     "set data.path (one file to split) or data.train_path/val_path, not both"),
    ("table-positive-label", lambda o, d, f: classification(o, f / "tickets.csv", "data.positive_label=z",
                                                            "data.val_fraction=0.25", "data.test_fraction=0.25"),
     "data.positive_label 'z' is not a class (a, b, c)"),
    ("table-too-small-to-split", lambda o, d, f: classification(o, f / "tickets.csv"),
     "tickets.csv: cannot split 12 examples of 3 classes by val_fraction=0.1, test_fraction=0.2"),
    ("table-no-data", lambda o, d, f: ["run", "classification", "--config", "classification_tiny", f"output_dir={o}", "overwrite=true"],
     "no data: set data.path"),
    ("text-empty-file", lambda o, d, f: text(o, f / "empty.txt"), "empty.txt: empty file"),
    ("text-not-utf8", lambda o, d, f: text(o, f / "latin1.txt"), "latin1.txt: not UTF-8 text"),
    ("text-binary", lambda o, d, f: text(o, f / "nul.txt"), "nul.txt: binary file (NUL bytes)"),
    ("text-no-txt-files", lambda o, d, f: text(o, f / "nodocs"), "nodocs: directory holds no .txt files"),
    ("text-glob-matches-nothing", lambda o, d, f: text(o, f / "*.nothing"), "matches no file"),
    ("text-too-short", lambda o, d, f: text(o, f / "short.txt"), "tokens; data.max_length=64 needs at least 65"),
    ("text-stride", lambda o, d, f: text(o, "null", "data.stride=100"), "stride 100 > max_length 64"),
    ("text-beyond-context", lambda o, d, f: text(o, "null", "data.max_length=300", "data.stride=300"),
     "data.max_length=300 is beyond the model's context of 256 tokens"),
    ("predict-out-exists", lambda o, d, f: ["predict", str(o), "--data", str(f / "tickets.csv"), "--out", str(f / "tickets.csv")],
     "tickets.csv exists; choose a new file"),
    ("predict-not-a-classifier", lambda o, d, f: ["predict", str(f / "lm_ckpt"), "--data", str(f / "tickets.csv"),
                                                  "--out", str(f / "p.csv")], "lm_ckpt: a language model, not a classifier"),
    ("classify-not-a-classifier", lambda o, d, f: ["classify", str(f / "lm_ckpt"), "--text", "hi"], "a language model, not a classifier"),
    ("predict-empty-text", lambda o, d, f: ["predict", str(o), "--data", str(f / "emptytext.csv"), "--text-field", "body",
                                            "--out", str(f / "p.csv")], "emptytext.csv: row 13: empty text"),
    ("predict-missing-column", lambda o, d, f: ["predict", str(o), "--data", str(f / "tickets.csv"), "--out", str(f / "p.csv")],
     "tickets.csv: no column 'text' (columns: body, team); set --text-field"),
    # config
    ("config-unknown-key", lambda o, d, f: spam(o, d, "train.epoch=3"), "override train.epoch: unknown key"),
    ("config-wrong-type", lambda o, d, f: spam(o, d, "train.batch_size=eight"), "override train.batch_size"),
    ("config-negative-epochs", lambda o, d, f: spam(o, d, "train.epochs=-1"), "train.epochs: Input should be greater"),
    ("config-bad-choice", lambda o, d, f: spam(o, d, "train.schedule=linear"), "train.schedule: Input should be"),
    ("config-fractions", lambda o, d, f: spam(o, d, "data.val_fraction=0.5", "data.test_fraction=0.5"), "val_fraction + test_fraction"),
    ("config-yaml-syntax", lambda o, d, f: ["run", "spam", "--config", str(f / "broken.yaml")], "broken.yaml:"),
    ("config-file-unknown-key", lambda o, d, f: ["validate", str(f / "unknownkey.yaml")], "unknownkey.yaml:4: model.layers: unknown key"),
    ("config-recipe-mismatch", lambda o, d, f: ["run", "spam", "--config", str(f / "instruct.yaml")], "does not match"),
    ("config-unknown-recipe", lambda o, d, f: ["run", "sentiment"], "unknown recipe 'sentiment'"),
    ("config-override-syntax", lambda o, d, f: spam(o, d, "train.epochs"), "'train.epochs' is not key=value"),
    ("config-random-needs-preset", lambda o, d, f: spam(o, d, "model.name=./mine"), "needs a preset name"),
    ("config-too-many-blocks", lambda o, d, f: spam(o, d, "finetune.trainable=last_n_blocks", "finetune.n_blocks=5"), "n_blocks=5"),
    ("lora-rank", lambda o, d, f: spam(o, d, "finetune.trainable=lora", "lora.rank=0"), "lora.rank"),
    ("lora-target", lambda o, d, f: spam(o, d, "finetune.trainable=lora", "lora.targets=[q_proj]"), "valid targets:"),
    ("lora-unread-head", lambda o, d, f: spam(o, d, "finetune.trainable=lora", "lora.targets=[lm_head]"), "a classifier never uses the vocabulary head"),
    ("lora-train-module", lambda o, d, f: spam(o, d, "finetune.trainable=lora", "lora.train_modules=[classifier]"), "'classifier' matches no module"),
    ("run-exists", lambda o, d, f: tiny_spam_args(d, o), "holds a previous run"),
    ("resume-other-config", lambda o, d, f: tiny_spam_args(d, o, "train.epochs=1", "train.lr=0.5", "resume=true"), "needs the same config"),
    ("resume-finished", lambda o, d, f: tiny_spam_args(d, o, "train.epochs=1", "resume=true"), "already finished"),
    # checkpoints
    ("eval-not-a-run", lambda o, d, f: ["eval", str(f)], "not a run directory"),
    ("classify-not-a-checkpoint", lambda o, d, f: ["classify", str(f), "--text", "hi"], "no weights file"),
    ("merge-no-adapter", lambda o, d, f: ["merge", str(o), str(f / "merged")], "no adapter to merge"),
    ("generate-missing-path", lambda o, d, f: ["generate", "--model", str(f / "none"), "--prompt", "hi"], "no such file or directory"),
    ("generate-corrupt-weights", lambda o, d, f: ["generate", "--model", str(f / "corrupt_ckpt"), "--prompt", "hi"], "corrupt or truncated"),
    ("generate-dir-without-weights", lambda o, d, f: ["generate", "--model", str(f), "--prompt", "hi"], "no weights file"),
    ("respond-on-spam-run", lambda o, d, f: ["respond", str(o)], "a classifier; respond needs a language model"),
    # export and PEFT adapters
    ("export-no-checkpoint", lambda o, d, f: ["export", str(f / "norun"), str(f / "out")], "norun: no checkpoint found"),
    ("export-out-exists", lambda o, d, f: ["export", str(o), str(f)], "exists; export writes a new directory"),
    ("export-peft-without-lora", lambda o, d, f: ["export", str(o), str(f / "out"), "--format", "peft"], "has no LoRA adapter"),
    ("export-last-position", lambda o, d, f: ["export", str(f / "last_position_ckpt"), str(f / "out")],
     "model.pool=last_position reads padding positions"),
    ("export-peft-head-only-lora", lambda o, d, f: ["export", str(f / "head_lora_ckpt"), str(f / "out"), "--format", "peft"],
     "only the classification head has LoRA layers"),
    ("peft-no-config", lambda o, d, f: ["generate", "--model", str(f / "peft_noconfig"), "--prompt", "hi"],
     "peft_noconfig: not a checkpoint (no adapter_config.json)"),
    ("peft-malformed-config", lambda o, d, f: ["generate", "--model", str(f / "peft_malformed"), "--prompt", "hi"],
     "adapter_config.json: not valid JSON"),
    ("peft-pickle", lambda o, d, f: ["generate", "--model", str(f / "peft_pickle"), "--prompt", "hi"],
     "adapter_model.bin: pickled adapters are refused"),
    ("peft-dora", lambda o, d, f: ["generate", "--model", str(f / "peft_dora"), "--prompt", "hi"],
     "use_dora=true is not supported"),
    ("peft-wrong-base", lambda o, d, f: ["generate", "--model", str(f / "peft_wrong_base"), "--prompt", "hi"],
     "has shape (4, 60), the base needs (4, 64); the adapter was trained on another base"),
    ("peft-target", lambda o, d, f: ["classify", str(f / "peft_target"), "--text", "hi"], "LoRA on 'transformer.wte'"),
    ("eval-model-of-another-kind", lambda o, d, f: ["eval", str(o), "--model", str(f / "lm_ckpt")],
     "a language model, which the spam run"),
    ("respond-model-without-data", lambda o, d, f: ["respond", str(f / "lm_ckpt")], "not a run with a responses.jsonl (its test split); give --data FILE"),
    ("prompt-style-unknown", lambda o, d, f: instruct(o, f / "noinstruction.json") + ["data.prompt_style=vicuna"],
     "data.prompt_style: 'vicuna' is not a prompt style (alpaca, phi3, chatml, plain)"),
    ("prompt-template-without-instruction", lambda o, d, f: instruct(o, f / "noinstruction.json") + ['data.prompt_style="Q: {input}"'],
     "a template with an {instruction} placeholder"),
    ("respond-prompt-style-unknown", lambda o, d, f: ["respond", str(f / "lm_ckpt"), "--data", str(f / "object.json"),
                                                      "--prompt-style", "vicuna"], "--prompt-style: 'vicuna' is not a prompt style"),
    ("classify-a-language-model", lambda o, d, f: ["classify", str(f / "lm_ckpt"), "--text", "hi"],
     "lm_ckpt: a language model, not a classifier"),
    ("chat-with-a-classifier", lambda o, d, f: ["chat", str(f / "last_position_ckpt")], "a classifier; chat needs a language model"),
    ("generate-with-a-classifier", lambda o, d, f: ["generate", "--model", str(f / "last_position_ckpt"), "--prompt", "hi"],
     "a classifier; generate needs a language model"),
    ("serve-missing-model", lambda o, d, f: ["serve", str(f / "none"), "--port", "0"], "no such file or directory"),
    ("serve-random-needs-preset", lambda o, d, f: ["serve", "./mine", "--init", "random", "--port", "0"], "needs a preset name"),
    # comparing runs, the config reference, GGUF
    ("runs-missing-directory", lambda o, d, f: ["runs", str(f / "none")], "none: no such directory"),
    ("runs-unknown-sort", lambda o, d, f: ["runs", str(o.parent), "--sort", "test.bleu"], "--sort test.bleu: no run has it"),
    ("config-reference-unknown-recipe", lambda o, d, f: ["config", "summarise"], "unknown recipe 'summarise'"),
    ("sweep-unknown-key", lambda o, d, f: ["sweep", "spam", "train.lrr=[1e-3]", "--config", "spam_tiny", "--metric",
                                           "val.accuracy", "--out", str(f / "sweep")], "train.lrr"),
    ("export-gguf-classifier", lambda o, d, f: ["export", str(o), str(f / "out"), "--format", "gguf"],
     "llama.cpp has no GPT-2 classification head"),
    # CLI
    ("cli-unknown-command", lambda o, d, f: ["train"], "invalid choice: 'train'"),
    ("cli-bad-number", lambda o, d, f: ["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    ("cli-unknown-option", lambda o, d, f: ["eval", str(o), "--splits", "test"], "unrecognized arguments: --splits"),
    ("score-missing-file", lambda o, d, f: ["score", str(f / "none.jsonl")], "cannot read responses"),
    # GRPO: prompts, rewards and the start, all refused before a model is built (the room check needs the context)
    ("bundled-unknown", lambda o, d, f: instruct(o, "bundled:recipes"), "no bundled data named 'recipes'"),
    ("grpo-group-of-one", lambda o, d, f: grpo(o, "grpo.group_size=1"), "grpo.group_size"),
    ("grpo-no-prompts", lambda o, d, f: grpo(o, f"data.path={f / 'empty.json'}"), "empty.json: empty file"),
    ("grpo-reward-incomplete", lambda o, d, f: grpo(o, "grpo.rewards=[{kind: exact}]"), "'exact' reward needs column"),
    ("grpo-reward-column-missing", lambda o, d, f: grpo(o, "grpo.rewards=[{kind: number, column: solution}]"),
     "column 'solution'"),
    ("grpo-reward-weights-zero", lambda o, d, f: grpo(o, "grpo.rewards=[{kind: number, column: answer, weight: 0}]"),
     "weights sum to 0"),
    ("grpo-reward-unimportable", lambda o, d, f: grpo(o, "grpo.rewards=[{kind: function, function: 'nowhere:f'}]"),
     "cannot import 'nowhere'"),
    ("grpo-reward-label-unknown", lambda o, d, f: grpo(o, f"grpo.rewards=[{{kind: classifier, model: '{o}', label: x}}]"),
     "has no label 'x'"),
    ("grpo-no-room", lambda o, d, f: grpo(o, "grpo.max_new_tokens=250"), "leaving no room for grpo.max_new_tokens=250"),
    ("grpo-classifier-start", lambda o, d, f: grpo(o, f"model.name={o}", "model.init=pretrained"), "is a classifier"),
    # multi-label and regression: refused before any model is built
    ("multilabel-no-labels", lambda o, d, f: multilabel(o, f / "tags_nolabels.jsonl"), "no text of the train split has any label"),
    ("multilabel-separator-splits-nothing", lambda o, d, f: multilabel(o, f / "tags_comma.csv", "data.label_separator=','"),
     "data.label_separator ',' splits no row"),
    ("multilabel-not-a-list", lambda o, d, f: multilabel(o, f / "tags_notjson.csv"), "tags_notjson.csv: row 1: column 'labels'"),
    ("multilabel-flag", lambda o, d, f: multilabel(o, f / "tags_flag.csv", "data.label_fields=[a,b]"),
     "tags_flag.csv: row 6: column 'a' holds 'yes please'"),
    ("regression-text", lambda o, d, f: regression(o, f / "scores_text.csv"), "scores_text.csv: row 6: column 'score' holds 'high'"),
    ("regression-infinite", lambda o, d, f: regression(o, f / "scores_inf.csv"), "row 6: column 'score' holds 'inf'; targets must be finite"),
    ("regression-missing", lambda o, d, f: regression(o, f / "scores_missing.csv"), "row 6: missing target in column 'score'"),
    ("regression-constant", lambda o, d, f: regression(o, f / "scores_constant.csv"), "target 'score' has the same value"),
    ("reward-missing-side", lambda o, d, f: reward(o, f"data.path={f / 'pairs_one_side.jsonl'}"),
     "pairs_one_side.jsonl:2: missing"),
    ("reward-classifier-start", lambda o, d, f: reward(o, f"model.name={o}", "model.init=pretrained"), "is a classifier"),
    ("score-reward-model-not-one", lambda o, d, f: ["score", str(f / "scored.jsonl"), "--reward-model", str(o)],
     "not a reward model"),
    ("classify-response-not-reward", lambda o, d, f: ["classify", str(o), "--text", "hi", "--response", "x"],
     "is not a reward model; --response"),
    ("classify-reward-without-response", lambda o, d, f: ["classify", str(f / "reward_ckpt"), "--text", "hi"],
     "give one --response per --text (got 0 for 1)"),
    ("predict-reward-without-response", lambda o, d, f: ["predict", str(f / "reward_ckpt"), "--data",
                                                         str(f / "noresponse.jsonl"), "--out", str(f / "r.csv")],
     "noresponse.jsonl: no column 'response'"),
    # conversations: refused before any model is built
    ("chat-strict-unknown-role", lambda o, d, f: chat(o, f"data.path={f / 'chats_tool.jsonl'}", "data.strict=true"),
     "chats_tool.jsonl:2: a message with a role other than system, user or assistant"),
    ("chat-nothing-to-train", lambda o, d, f: chat(o, f"data.path={f / 'chats_none.jsonl'}"),
     "no conversation can be trained on (skipped 1 conversation(s) with no assistant message to train on"),
    ("chat-no-messages-column", lambda o, d, f: chat(o, f"data.path={f / 'chats_nocolumn.jsonl'}"),
     "no 'messages' column of conversations (columns: dialog)"),
    ("respond-bad-conversation", lambda o, d, f: ["respond", str(f / "lm_ckpt"), "--prompt-style", "chatml", "--data",
                                                  str(f / "chats_tool.jsonl"), "--out", str(f / "r.jsonl")],
     "chats_tool.jsonl:2: a message with a role other than system, user or assistant (ShareGPT: system, human, gpt) "
     "(message 1: 'tool'); fix the record"),
    ("chat-one-turn-format", lambda o, d, f: chat(o, "data.chat_format=plain"), "'plain' holds one turn"),
    ("chat-broken-jinja", lambda o, d, f: chat(o, f"data.chat_format={f / 'template.jinja'}"), "not a valid Jinja template"),
    ("chat-system-one-turn-style", lambda o, d, f: ["chat", str(f / "lm_ckpt"), "--prompt-style", "plain", "--system", "x"],
     "holds no system message"),
    ("instruct-chatml", lambda o, d, f: ["run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={o}",
                                         "overwrite=true", "data.prompt_style=chatml"],
     "'chatml' ends each reply with its own marker; train it with the chat recipe"),
    ("score-missing-field", lambda o, d, f: ["score", str(f / "responses.jsonl")], "responses.jsonl:1: missing string field 'response'"),
    ("score-judge-half", lambda o, d, f: ["score", str(f / "responses.jsonl"), "--judge-url", "http://127.0.0.1:1/api/chat"], "go together"),
]


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, expected, good_run, files, capsys):
    out, data = good_run
    before = snapshot(out)
    line = one_line_error(capsys, *argv(out, data, files))
    assert expected in line, line
    assert line.startswith("finetune")
    assert snapshot(out) == before, "a bad input changed the previous run's files"
    shutil.rmtree(files / "merged", ignore_errors=True)
