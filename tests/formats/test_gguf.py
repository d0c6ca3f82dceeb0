"""GGUF export, loaded by llama.cpp itself (llama-cpp-python): its logits equal ours, its greedy text is
ours, its chat template gives the prompt `finetune respond` gives, and the Ollama Modelfile's TEMPLATE
renders the run's prompt style."""

import json
import os
import re

import numpy as np
import pytest
import torch
from finetune.datasets import INSTRUCTIONS, bundled

from finetune.cli import main
from finetune.inference.generate import generate
from finetune.data.prompts import format_prompt
from finetune.data.records import Record
from finetune.inference.respond import prompt_tokens, respond
from finetune.model.tokenizer import EOT_ID, encode
from finetune.formats.loading import load_pretrained, load_with_meta
from tests.conftest import make_hf_checkpoint
from tests.helpers import cli, one_line_error

if os.environ.get("CI"):  # CI installs the dev extra: there, a missing llama.cpp is a failure, never a skip
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason='llama-cpp-python is not installed (pip install -e ".[dev]")')

PROMPTS = ["Every effort moves you", "The", "It had always been my fate to", "I HAD always thought Jack Gisburn rather a cheap genius",
           "Hello, world! 123", "  leading spaces and\nnew lines", "naïve café – «quotes» and emoji 🙂", "def f(x):\n    return x * 2",
           "<|endoftext|>", "A longer prompt, with punctuation; numbers like 3.14159 and 2,718; and CAPITALS."]
# llama.cpp's CPU backend computes GELU from a table of fp16 values (ggml's GGML_GELU_FP16, a build-time
# choice): with that one step done the same way here, f32 logits agree within 1e-4 (measured 6.0e-5); as
# plain PyTorch computes GELU, within 5e-4 (measured 1.3e-4 to 1.6e-4) on this random 64-wide model. f16 and
# q8_0 against plain PyTorch: 4.1e-4 and 1.1e-2, measured 2026-11-28 (Intel Xeon, 2 cores), bounds with room.
TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "q8_0": 3e-2}
PLAIN_F32_TOLERANCE = 5e-4


def gelu_as_llama_cpp(x, approximate="none"):
    """ggml's table lookup: the input rounded to fp16, the result stored as fp16; saturated beyond ±10."""
    y = _GELU(x.half().float(), approximate=approximate).half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


_GELU = torch.nn.functional.gelu


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0, **kwargs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A transformers GPT-2 whose every tensor is random, 64 wide (q8_0 blocks are 32 values)."""
    root = tmp_path_factory.mktemp("gguf")
    make_hf_checkpoint(root / "hf", n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return root


def worst_logit_difference(llm, model) -> float:
    worst = 0.0
    for text in PROMPTS:
        tokens = encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokens, text  # the same BPE
        llm.reset()
        llm.eval(tokens)
        theirs = np.asarray(llm.scores[: len(tokens)])
        with torch.no_grad():
            ours = model(torch.tensor([tokens]))[0].numpy()
        worst = max(worst, float(np.abs(theirs - ours).max()))
    return worst


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_computes_our_logits(base, dtype, monkeypatch):
    out = base / f"gguf-{dtype}"
    assert main(["export", str(base / "hf"), str(out), "--format", "gguf", "--dtype", dtype]) == 0
    model = load_pretrained(base / "hf").eval()
    llm = llama(out / "model.gguf", type_k=0, type_v=0)  # an f32 KV cache: the default is f16
    plain = worst_logit_difference(llm, model)
    print(f"{dtype}: largest |logit difference| {plain:.2e} (PyTorch's GELU)")
    if dtype == "f32":
        assert plain < PLAIN_F32_TOLERANCE
        monkeypatch.setattr(torch.nn.functional, "gelu", gelu_as_llama_cpp)
        exact = worst_logit_difference(llm, model)
        print(f"f32: largest |logit difference| {exact:.2e} (llama.cpp's fp16 GELU table)")
        assert exact < TOLERANCE["f32"]
    else:
        assert plain < TOLERANCE[dtype]


def test_greedy_continuations_are_ours_token_for_token(base):
    out = base / "gguf-greedy"
    assert main(["export", str(base / "hf"), str(out), "--format", "gguf"]) == 0
    model = load_pretrained(base / "hf").eval()
    llm = llama(out / "model.gguf")
    for text in PROMPTS[:5]:
        tokens = encode(text)
        ours = generate(model, [tokens], 20)[0][len(tokens):]
        llm.reset()
        theirs = []
        for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            theirs.append(token)
            if len(theirs) == 20:
                break
        assert theirs == ours, text


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_instruct")
    (root / "data.json").write_text(json.dumps(json.loads(bundled(INSTRUCTIONS).read_text())[:40]))
    assert main(["run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={root / 'run'}",
                 f"data.path={root / 'data.json'}", "data.prompt_style=phi3", "finetune.trainable=lora", "train.epochs=1",
                 "train.eval_every=0", "train.eval_at_start=false", "train.lr=5e-3", "generation.max_new_tokens=8"]) == 0
    assert main(["export", str(root / "run"), str(root / "gguf"), "--format", "gguf"]) == 0
    return root


def test_llama_cpp_chat_prompts_and_answers_as_finetune_respond(instruct_run):
    """llama.cpp's chat completion, with the template embedded in the file: the prompt tokens of
    `finetune respond` (counted in its usage), and the same greedy reply."""
    llm = llama(instruct_run / "gguf" / "model.gguf")
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model, meta = load_with_meta(instruct_run / "run")
    from finetune.checkpoints.interface import interface_of

    generation = interface_of(meta).generation
    for r in json.loads((instruct_run / "data.json").read_text())[30:35]:
        parts = [{"type": "text", "text": r["instruction"]}] + ([{"type": "text", "text": r["input"]}] if r["input"] else [])
        messages = [{"role": "user", "content": parts}]
        prompt = formatter(messages=messages).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_tokens(Record(r["instruction"], r["input"]), "phi3")
        if not r["input"]:
            reply = llm.create_chat_completion([{"role": "user", "content": r["instruction"]}], temperature=0.0, top_k=1,
                                               max_tokens=generation.max_new_tokens)
            assert reply["usage"]["prompt_tokens"] == len(prompt_tokens(Record(r["instruction"]), "phi3"))
            expected = respond(model.eval(), [Record(r["instruction"])], "phi3", generation)[0]
            assert reply["choices"][0]["message"]["content"].strip() == expected


def test_the_modelfile_template_renders_the_runs_prompt_style(instruct_run):
    """Ollama fills `{{ .Prompt }}` with the user's message (rendered here as Ollama's Go template would)."""
    text = (instruct_run / "gguf" / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert set(re.findall(r"{{.*?}}", template)) == {"{{ .Prompt }}"}
    records = [r for r in json.loads((instruct_run / "data.json").read_text()) if not r["input"]][:5]
    for r in records:
        assert template.replace("{{ .Prompt }}", r["instruction"]) == format_prompt("phi3", r["instruction"])
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER num_predict 8" in text and "PARAMETER temperature 0" in text


@pytest.mark.parametrize("form", ["kept", "merged", "transformers", "peft"])
def test_every_form_of_a_model_exports_the_same_file(instruct_run, tmp_path, form):
    run = instruct_run / "run"
    source = {"kept": run / "best"}.get(form)
    if source is None:
        source = tmp_path / form
        argv = ["merge", str(run), str(source)] if form == "merged" else \
            ["export", str(run), str(source), *(["--format", "peft"] if form == "peft" else [])]
        assert main(argv) == 0
    assert main(["export", str(source), str(tmp_path / "gguf"), "--format", "gguf"]) == 0
    from gguf import GGUFReader

    ours, theirs = GGUFReader(instruct_run / "gguf" / "model.gguf"), GGUFReader(tmp_path / "gguf" / "model.gguf")
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.name == b.name and np.allclose(a.data, b.data, atol=1e-6), (form, a.name)
    assert bytes(theirs.fields["tokenizer.chat_template"].parts[-1]) == bytes(ours.fields["tokenizer.chat_template"].parts[-1])


def test_a_classifier_is_refused_in_one_line(tmp_path, capsys):
    from finetune.checkpoints.atomic import write_directory
    from finetune.model.classifier import GPTClassifier
    from finetune.model.gpt import GPT, GPTConfig
    from finetune.checkpoints.model_files import model_files

    write_directory(tmp_path / "clf", model_files(GPTClassifier(GPT(GPTConfig.from_preset("gpt2-tiny")), 2),
                                                  {"labels": ["a", "b"], "max_length": 8}))
    line = one_line_error(capsys, "export", str(tmp_path / "clf"), str(tmp_path / "out"), "--format", "gguf")
    assert "llama.cpp has no GPT-2 classification head" in line
    assert not (tmp_path / "out").exists()


def test_without_the_gguf_package_the_extra_is_named(tmp_path, capsys, monkeypatch):
    import sys

    from finetune.checkpoints.atomic import write_directory
    from finetune.model.gpt import GPT, GPTConfig
    from finetune.checkpoints.model_files import model_files

    write_directory(tmp_path / "lm", model_files(GPT(GPTConfig.from_preset("gpt2-tiny")), {}))
    monkeypatch.setitem(sys.modules, "gguf", None)
    line = one_line_error(capsys, "export", str(tmp_path / "lm"), str(tmp_path / "out"), "--format", "gguf")
    assert 'pip install "finetune-gpt2[gguf]"' in line
    assert cli(capsys, "export", str(tmp_path / "lm"), str(tmp_path / "out2"))[0] == 0  # other formats need no gguf
    assert EOT_ID == 50256
