"""Leaving the toolkit and coming back: runs exported for transformers and peft, PEFT adapters imported.

transformers and peft are the oracles: every exported model is loaded by them and must compute our
logits; every imported adapter must compute peft's. Runs train on a base in the real transformers
layout whose every tensor is random and distinct (tests/conftest.py).
"""

import json

import pytest
import torch
import yaml

from finetune.model.classifier import GPTClassifier
from finetune.checkpoints.run_directory import checkpoint_dirs, kept_checkpoint
from finetune.model.tokenizer import EOT_ID, encode
from finetune.formats.loading import load_model, load_pretrained, load_with_meta
from tests.conftest import SMALL, make_hf_checkpoint
from tests.helpers import cli, small_spam_file, ticket_frame
from tests.model.test_tokenizer import SAMPLES

TOL = 1e-5
TEXTS = ["Every effort moves you", "The quick brown fox jumps over the lazy dog, again and again.", "Hi"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    make_hf_checkpoint(directory, seed=7, **SMALL)
    return directory


def _run(root, name, argv):
    from finetune.cli import main

    out = root / name
    assert main([*argv, f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base):
    """LoRA and partial runs, language model and classifiers (2 and 5 classes), each trained briefly."""
    root = tmp_path_factory.mktemp("runs")
    sms = small_spam_file(root / "sms.tsv")
    tickets = root / "tickets.csv"
    ticket_frame(classes=5, per_class=12).to_csv(tickets, index=False)
    on_base = [f"model.name={base}", "model.init=pretrained"]
    text = ["run", "text", "--quiet", "--config", "text_tiny", f"data.cache_dir={root / 'cache'}", "train.epochs=1",
            "data.max_length=32", "data.stride=32", "train.eval_at_start=false"]
    lora = ["finetune.trainable=lora", "lora.rank=4", "lora.alpha=12", "train.lr=5e-3"]
    classify = ["run", "classification", "--quiet", "--config", "classification_tiny", f"data.path={tickets}",
                "data.text_field=body", "data.label_field=team", "train.epochs=2", "data.max_length=40"]
    return {
        "lm_lora": _run(root, "lm_lora", [*text, *on_base, *lora, "lora.train_modules=[ln_f]"]),
        "lm_book_lora": _run(root, "lm_book_lora", [*text, "model.name=gpt2-tiny", "model.init=book", *lora,
                                                     "lora.targets=[attn.qkv, mlp.proj, lm_head]"]),
        "spam_lora": _run(root, "spam_lora", ["run", "spam", "--quiet", f"data.path={sms}", *on_base, *lora,
                                              "lora.train_modules=[head]", "train.epochs=2", "data.max_length=32",
                                              "train.batch_size=8"]),
        "tickets_last_block": _run(root, "tickets_last_block", [*classify, *on_base, "finetune.trainable=last_block"]),
        "tickets_lora_head": _run(root, "tickets_lora_head", [*classify, *on_base, *lora,
                                                              "lora.targets=[attn.qkv, mlp.fc, head]"]),
    }


def export(capsys, source, out, *extra):
    code, stdout, err = cli(capsys, "export", str(source), str(out), *extra)
    assert code == 0, err
    return out


def padded_batch(texts):
    ids = [encode(t) for t in texts]
    width = max(map(len, ids))
    return (torch.tensor([row + [EOT_ID] * (width - len(row)) for row in ids]),
            torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]))


def ours_lm(run):
    return load_model(kept_checkpoint(run))[0].eval()


def assert_lm_logits_equal(model, reference, tol=TOL):
    """Logits at every real position of a right-padded batch."""
    ids, mask = padded_batch(TEXTS)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        got = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= tol


def classifier_logits(model, texts):
    ids, mask = padded_batch(texts)
    with torch.no_grad():
        return model(ids, mask)


# -- transformers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lm_lora", "lm_book_lora"])
def test_language_model_exports_for_transformers(runs, name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.inference.generate import generate

    out = export(capsys, runs[name], tmp_path / "hf")
    ours = ours_lm(runs[name])
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.tie_word_embeddings == (name == "lm_lora")  # the book init has its own head
    assert_lm_logits_equal(ours, hf)
    prompt = encode(TEXTS[0])
    expected = generate(ours, [prompt], 20)[0]
    got = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=20, do_sample=False, pad_token_id=EOT_ID)[0].tolist()
    assert got[:len(expected)] == expected  # transformers stops at the same EOS; ours stops there too
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in SAMPLES + TEXTS:
        assert tokenizer(text)["input_ids"] == encode(text), text
    assert tokenizer.decode(encode(SAMPLES[2])) == SAMPLES[2]


def card(directory):
    text = (directory / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_model_card_is_in_the_hubs_format(runs, base, tmp_path, capsys):
    front, body = card(export(capsys, runs["spam_lora"], tmp_path / "hf"))
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-classification"
    assert front["datasets"] == ["sms.tsv"] and front["metrics"] == ["accuracy", "f1"]
    metrics = json.loads((runs["spam_lora"] / "metrics.json").read_text())
    assert f"| test | {metrics['test']['accuracy']:.4f} |" in body  # the run's final metrics
    assert "recipe: spam" in body and "`ham`, `spam`" in body  # its config and labels
    front, _ = card(export(capsys, runs["lm_lora"], tmp_path / "peft", "--format", "peft"))
    assert front["library_name"] == "peft" and front["base_model"] == str(base.resolve())


@pytest.mark.parametrize("name, classes", [("spam_lora", 2), ("tickets_last_block", 5), ("tickets_lora_head", 5)])
def test_classifier_exports_for_transformers(runs, name, classes, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, pipeline

    ours, meta = load_model(kept_checkpoint(runs[name]))
    ours.eval()
    assert ours.head.bias.abs().max() > 1e-3  # the head has a real bias for the export to fold in
    out = export(capsys, runs[name], tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == classes
    texts = [*TEXTS, "Win a free prize now!!! Call 0800 now", "invoice refund payment card please"]
    ids, mask = padded_batch(texts)
    with torch.no_grad():
        expected = ours(ids, mask)
        assert (hf(input_ids=ids, attention_mask=mask).logits - expected).abs().max().item() <= TOL
    code, stdout, _ = cli(capsys, "classify", str(runs[name]), *sum((["--text", t] for t in texts), []))
    labels = [line.split("\t")[0] for line in stdout.splitlines()]
    assert labels == [meta["labels"][i] for i in expected.argmax(-1).tolist()]
    assert [r["label"] for r in pipeline("text-classification", model=str(out))(texts)] == labels


def test_export_round_trips_through_load_pretrained(runs, tmp_path, capsys):
    """A language model comes back bit for bit (as merged: merging rounds once); a classifier to fp32
    rounding, its head's bias having moved into ln_f."""
    from finetune.model.lora import merged_model

    for name in ("lm_lora", "spam_lora"):
        ours = load_model(kept_checkpoint(runs[name]))[0].eval()
        back, meta = load_with_meta(export(capsys, runs[name], tmp_path / name))
        back.eval()
        if isinstance(ours, GPTClassifier):
            assert meta["labels"] == ["ham", "spam"]
            texts = [*TEXTS, "call now to claim"]
            assert torch.equal(classifier_logits(back, texts).argmax(-1), classifier_logits(ours, texts).argmax(-1))
            assert (classifier_logits(back, texts) - classifier_logits(ours, texts)).abs().max() <= TOL
        else:
            ids, _ = padded_batch(TEXTS[:1])
            with torch.no_grad():
                assert (back(ids) - ours(ids)).abs().max() <= TOL
                assert torch.equal(back(ids), merged_model(ours)(ids))


# -- peft export -----------------------------------------------------------------------------------


def test_lora_run_exports_a_peft_adapter(runs, base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    out = export(capsys, runs["lm_lora"], tmp_path / "adapter", "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4 and config["lora_alpha"] == 12
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert config["modules_to_save"] == ["transformer.ln_f"]
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out).eval()
    assert_lm_logits_equal(ours_lm(runs["lm_lora"]), model)
    merged = model.merge_and_unload().state_dict()
    ours = export(capsys, runs["lm_lora"], tmp_path / "merged")
    from safetensors.torch import load_file

    exported = load_file(ours / "model.safetensors")
    for key, t in exported.items():
        assert (merged[key] - t).abs().max() <= 1e-6, key


def test_random_init_base_is_written_beside_the_adapter(runs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    out = export(capsys, runs["lm_book_lora"], tmp_path / "adapter", "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert "lm_head" in config["target_modules"]
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(out / "base"), out).eval()
    assert_lm_logits_equal(ours_lm(runs["lm_book_lora"]), model)


@pytest.mark.parametrize("name", ["spam_lora", "tickets_lora_head"])
def test_lora_classifier_exports_a_peft_adapter(runs, base, name, tmp_path, capsys):
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification

    ours, meta = load_model(kept_checkpoint(runs[name]))
    out = export(capsys, runs[name], tmp_path / "adapter", "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and set(config["modules_to_save"]) == {"score", "transformer.ln_f"}
    hf = GPT2ForSequenceClassification.from_pretrained(base, num_labels=len(meta["labels"]), pad_token_id=EOT_ID)
    model = PeftModel.from_pretrained(hf, out).eval()
    texts = [*TEXTS, "free entry to win cash"]
    ids, mask = padded_batch(texts)
    with torch.no_grad():
        expected = classifier_logits(ours.eval(), texts)
        assert (model(input_ids=ids, attention_mask=mask).logits - expected).abs().max().item() <= TOL
        merged = model.merge_and_unload()
        hf_export = GPT2ForSequenceClassification.from_pretrained(export(capsys, runs[name], tmp_path / "hf")).eval()
        assert (merged(input_ids=ids, attention_mask=mask).logits - hf_export(input_ids=ids, attention_mask=mask).logits
                ).abs().max().item() <= TOL


# -- peft import -----------------------------------------------------------------------------------


def peft_adapter(directory, base, task, seed=0, **lora):
    """An adapter made by peft itself, its A and B random and non-zero (and a random score layer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    if task == "SEQ_CLS":
        hf = GPT2ForSequenceClassification.from_pretrained(base, num_labels=3, pad_token_id=EOT_ID)
    else:
        hf = GPT2LMHeadModel.from_pretrained(base)
    config = LoraConfig(task_type=task, r=4, lora_alpha=8, fan_in_fan_out=True, **lora)
    model = get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model.eval()


def test_peft_language_model_adapter_loads_into_our_lora_layers(base, tmp_path, capsys):
    from finetune.model.lora import lora_layers

    reference = peft_adapter(tmp_path / "adapter", base, "CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"])
    ours = load_pretrained(tmp_path / "adapter").eval()
    assert len(lora_layers(ours)) == 3 * 3 + 3  # c_attn, c_fc and both c_proj in each of 3 blocks
    assert_lm_logits_equal(ours, reference)
    code, stdout, err = cli(capsys, "generate", "--model", str(tmp_path / "adapter"), "--prompt", TEXTS[0],
                            "--max-new-tokens", "8")
    prompt = torch.tensor([encode(TEXTS[0])])
    expected = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                  do_sample=False, pad_token_id=EOT_ID)[0, prompt.shape[1]:].tolist()
    from finetune.model.tokenizer import get_tokenizer

    assert code == 0 and stdout.rstrip("\n") == get_tokenizer().decode([t for t in expected if t != EOT_ID]), err


def test_peft_classifier_adapter_loads_classifies_and_trains_on(base, tmp_path, capsys):
    reference = peft_adapter(tmp_path / "adapter", base, "SEQ_CLS", target_modules=["c_attn", "mlp.c_proj"])
    model, meta = load_with_meta(tmp_path / "adapter")
    texts = [*TEXTS, "call now"]
    ids, mask = padded_batch(texts)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    assert (classifier_logits(model.eval(), texts) - expected).abs().max().item() <= TOL
    code, stdout, _ = cli(capsys, "classify", str(tmp_path / "adapter"), *sum((["--text", t] for t in texts), []))
    assert [line.split("\t")[0] for line in stdout.splitlines()] == [f"LABEL_{i}" for i in expected.argmax(-1).tolist()]

    # Training goes on from the adapter: its first evaluation is the imported model's, on the same data.
    data = tmp_path / "tickets.csv"
    ticket_frame(classes=3, per_class=12).to_csv(data, index=False)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "classification", "--quiet", "--config", "classification_tiny",
                       f"output_dir={run}", f"data.path={data}", "data.text_field=body", "data.label_field=team",
                       f"model.name={tmp_path / 'adapter'}", "model.init=pretrained", "finetune.trainable=lora",
                       "lora.train_modules=[head]", "train.epochs=1", "train.eval_at_start=true")
    assert code == 0, err
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    code, stdout, err = cli(capsys, "eval", str(run), "--split", "val", "--json", "--model", str(tmp_path / "adapter"))
    assert code == 0, err
    assert (first["step"], first["split"]) == (0, "val") and abs(json.loads(stdout)["val"]["loss"] - first["loss"]) <= 1e-5
    trained = load_model(checkpoint_dirs(run)[-1])[0]  # the last step (best/ may be step 0)
    assert adapted(trained) == adapted(model) == [f"gpt.blocks.{i}.{m}" for i in range(3) for m in ("attn.qkv", "mlp.proj")]
    assert not torch.equal(trained.gpt.blocks[0].attn.qkv.lora_B, model.gpt.blocks[0].attn.qkv.lora_B)


def adapted(model):
    from finetune.model.lora import LoRALinear

    return [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_readme_snippets_run(runs, base, tmp_path, monkeypatch, capsys):
    """docs/export.md's transformers and PEFT commands and Python blocks, run as written (the hub base
    replaced by the local one, since nothing can be downloaded here)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).parent.parent.parent / "docs" / "export.md").read_text()
    section = page.split("\n## ", 1)[0]  # before the GGUF section
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name, run in (("instruct", "lm_lora"), ("spam", "tickets_last_block"), ("spam_lora", "spam_lora")):
        (tmp_path / "runs" / name).symlink_to(runs[run])
    commands = [line.split("#")[0] for line in section.splitlines() if line.startswith("finetune export")]
    assert len(commands) == 3
    for command in commands:
        code, _, err = cli(capsys, *shlex.split(command)[1:])
        assert code == 0, f"{command}: {err}"
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(block.replace("openai-community/gpt2", str(base)), {})
