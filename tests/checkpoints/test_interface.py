"""A trained model knows what it is: its prompt style and generation defaults travel with every
checkpoint and export, so `serve`, `chat` and `respond` answer the same whatever form of the model they
are given; transformers' chat template reproduces the prompt a run trained on; recipes plug in from
other packages; checkpoints written before all this still load."""

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune.datasets import INSTRUCTIONS, PREFERENCES, bundled

from finetune.checkpoints.atomic import write_directory
from finetune.cli import main
from finetune.inference.loading import load_for_use
from finetune.checkpoints.interface import Generation, interface_meta
from finetune.model.gpt import GPT, GPTConfig
from finetune.data.prompts import format_prompt
from finetune.data.records import Record
from finetune.inference.respond import prompt_tokens, respond
from finetune.checkpoints.model_files import model_files
from finetune.serve.app import create_app
from tests.helpers import cli
from tests.serve.test_serve import Running

FIXTURE = Path(__file__).parent.parent / "fixtures" / "instruct_run_0.2.0"
STYLES = ["alpaca", "phi3", "plain", "Q: {instruction}\nContext: {input}\nA:", "### Task\n{instruction}\n### Answer\n"]


def bundled_records(n: int) -> list[dict]:
    return json.loads(bundled(INSTRUCTIONS).read_text())[:n]


# -- prompt styles -------------------------------------------------------------------------------


def test_styles_are_the_books_templates():
    assert format_prompt("phi3", "Rewrite it.", "The car is fast.") == "<|user|>\nRewrite it.\nThe car is fast.\n<|assistant|>:\n"
    assert format_prompt("phi3", "Say hi.") == "<|user|>\nSay hi.\n<|assistant|>:\n"  # the book's exercise 7.1
    assert format_prompt("plain", "Say hi.", "now") == "Say hi.\nnow"
    assert format_prompt(STYLES[3], "Add.", "1+1") == "Q: Add.\nContext: 1+1\nA:"
    assert format_prompt(STYLES[3], "Add.") == "Q: Add.\nContext: \nA:"  # a template's own text stays
    assert format_prompt(STYLES[4], "Add.", "1+1") == "### Task\nAdd.\n1+1\n### Answer\n"


@pytest.mark.parametrize("style", STYLES, ids=["alpaca", "phi3", "plain", "template_with_input", "template"])
def test_an_exports_chat_template_renders_the_prompt_the_run_trained_on(tmp_path, style):
    """transformers' apply_chat_template on a transformers export, for 10 records with and without input:
    the same text, byte for byte, and the same token ids as the recipe's prompt."""
    from transformers import AutoTokenizer

    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    meta = interface_meta(style, Generation(max_new_tokens=7), seed=1)
    write_directory(tmp_path / "ckpt", model_files(model, meta))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    records = [r for r in bundled_records(60) if r["input"]][:5] + [r for r in bundled_records(60) if not r["input"]][:5]
    for r in records:
        parts = [{"type": "text", "text": r["instruction"]}] + ([{"type": "text", "text": r["input"]}] if r["input"] else [])
        messages = [{"role": "user", "content": parts}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == format_prompt(style, r["instruction"], r["input"])
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(ids["input_ids"]) == prompt_tokens(Record(r["instruction"], r["input"]), style)
    plain = [{"role": "user", "content": records[-1]["instruction"]}]  # a string content is the instruction
    assert tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False) == format_prompt(
        style, records[-1]["instruction"])
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["finetune_max_new_tokens"] == 7 and generation["do_sample"] is False
    assert generation["eos_token_id"] == 50256 and "max_new_tokens" not in generation


def test_an_exports_generation_length_yields_to_the_callers(tmp_path):
    """transformers on an export: a caller's max_length (lm-evaluation-harness's) and max_new_tokens are each
    honoured, and a plain generate() answers up to the context, not the run's max_new_tokens (7 here)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_layer=2, n_head=2, context_length=40))
    write_directory(tmp_path / "ckpt", model_files(model, interface_meta("alpaca", Generation(max_new_tokens=7), seed=1)))
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([[464, 3290, 318]])

    def new_tokens(**kwargs) -> int:
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=50256, **kwargs)
        return out.shape[1] - prompt.shape[1]

    assert new_tokens(max_length=3 + 24) == 24  # (this seeded model never ends its text early)
    assert new_tokens(max_new_tokens=5) == 5
    assert new_tokens() == 40 - 3  # to the context
    assert load_for_use(str(tmp_path / "hf")).interface.generation.max_new_tokens == 7  # finetune's own default


# -- the same reply from every form of a model ----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two LoRA instruct runs of gpt2-tiny, alpaca and phi3, each with every form of its model."""
    root = tmp_path_factory.mktemp("forms")
    records = bundled_records(120)
    with_input, without = [r for r in records if r["input"]], [r for r in records if not r["input"]]
    data = without[:34] + [with_input[0], without[34], with_input[1], without[35]] + without[36:38]  # test: 34..37
    (root / "data.json").write_text(json.dumps(data))
    runs = {}
    for style in ("alpaca", "phi3"):
        out = root / style
        assert main(["run", "instruct", "--quiet", "--config", "instruct_tiny", f"output_dir={out}",
                     f"data.path={root / 'data.json'}", f"data.prompt_style={style}", "finetune.trainable=lora",
                     "lora.rank=4", "train.epochs=1", "train.eval_every=0", "train.eval_at_start=false",
                     "train.lr=5e-3", "train.warmup_steps=0", "generation.max_new_tokens=8"]) == 0
        forms = {"run": out, "step checkpoint": sorted((out / "checkpoints").glob("step-*"))[-1], "kept": out / "best"}
        for name, argv in (("merged", ["merge", str(out), str(root / f"{style}-merged")]),
                           ("transformers", ["export", str(out), str(root / f"{style}-hf")]),
                           ("peft", ["export", str(out), str(root / f"{style}-peft"), "--format", "peft"])):
            assert main(argv) == 0
            forms[name] = Path(argv[2])
        runs[style] = forms
    # Preference tuning from the alpaca run, with a new LoRA adapter: served and exported as any instruct run.
    preferences = json.loads(bundled(PREFERENCES).read_text())[:40]
    (root / "prefs.json").write_text(json.dumps(preferences))
    out = root / "dpo"
    assert main(["run", "dpo", "--quiet", "--config", "dpo_tiny", f"output_dir={out}", f"data.path={root / 'prefs.json'}",
                 f"model.name={runs['alpaca']['run']}", "model.init=pretrained", "finetune.trainable=lora",
                 "train.eval_every=0", "train.eval_at_start=false", "generation.max_new_tokens=8"]) == 0
    forms = {"run": out, "step checkpoint": sorted((out / "checkpoints").glob("step-*"))[-1], "kept": out / "best"}
    for name, argv in (("merged", ["merge", str(out), str(root / "dpo-merged")]),
                       ("transformers", ["export", str(out), str(root / "dpo-hf")]),
                       ("peft", ["export", str(out), str(root / "dpo-peft"), "--format", "peft"])):
        assert main(argv) == 0
        forms[name] = Path(argv[2])
    runs["dpo"] = forms
    return root, runs


def expected_replies(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("style", ["alpaca", "phi3", "dpo"])
def test_serve_answers_chat_as_the_run_did_whatever_form_the_model_takes(trained, style):
    """Chat completions at temperature 0, the user's text parts the instruction and its input."""
    from openai import OpenAI

    _, runs = trained
    expected = expected_replies(runs[style]["run"])
    for form, target in runs[style].items():
        served = Running(create_app(load_for_use(str(target))))
        try:
            client = OpenAI(base_url=f"{served.url}/v1", api_key="none")
            for r in expected:
                content = [{"type": "text", "text": r["instruction"]}] + (
                    [{"type": "text", "text": r["input"]}] if r["input"] else [])
                reply = client.chat.completions.create(model="m", temperature=0, messages=[{"role": "user", "content": content}])
                assert reply.choices[0].message.content == r["response"], form
        finally:
            served.close()


@pytest.mark.parametrize("style", ["alpaca", "phi3", "dpo"])
def test_respond_and_chat_answer_as_the_run_did_whatever_form_the_model_takes(trained, style, capsys, monkeypatch):
    root, runs = trained
    expected = expected_replies(runs[style]["run"])
    assert len(expected) == 4 and sum(bool(r["input"]) for r in expected) >= 1
    (root / "test.json").write_text(json.dumps([{k: r[k] for k in ("instruction", "input")} for r in expected]))
    for form, target in runs[style].items():
        out = root / f"{style}-{form.replace(' ', '_')}.jsonl"
        code, _, err = cli(capsys, "respond", str(target), "--data", str(root / "test.json"), "--out", str(out))
        assert code == 0, err
        assert [r["response"] for r in expected_replies_at(out)] == [r["response"] for r in expected], form

        asked = [f"{r['instruction']} || {r['input']}" if r["input"] else r["instruction"] for r in expected]
        lines = iter([line for question in asked for line in (question, "/reset")])  # chat keeps a conversation
        monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines, ""))
        code, printed, err = cli(capsys, "chat", str(target))
        assert code == 0, err
        assert printed.splitlines() == [r["response"] for r in expected], form

def expected_replies_at(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_matrix_can_fail_a_model_prompted_in_another_style(trained):
    """The replies above depend on the style: prompted as phi3, the alpaca run answers otherwise."""
    _, runs = trained
    loaded = load_for_use(str(runs["alpaca"]["run"]))
    expected = expected_replies(runs["alpaca"]["run"])
    records = [Record(r["instruction"], r["input"]) for r in expected]
    assert respond(loaded.model, records, "alpaca", loaded.interface.generation) == [r["response"] for r in expected]
    assert respond(loaded.model, records, "phi3", loaded.interface.generation) != [r["response"] for r in expected]


def test_generation_defaults_travel_and_requests_can_override_them(trained):
    _, runs = trained
    for form in ("run", "merged", "transformers", "peft"):
        loaded = load_for_use(str(runs["phi3"][form]))
        assert loaded.interface.prompt_style == "phi3", form
        assert loaded.interface.generation.max_new_tokens == 8 and loaded.interface.generation.temperature == 0, form


# -- checkpoints written before interfaces were stored ---------------------------------------------


def test_a_run_written_by_finetune_0_2_still_answers_as_it_did(tmp_path, capsys):
    out = tmp_path / "responses.jsonl"
    code, _, err = cli(capsys, "respond", str(FIXTURE), "--data", str(FIXTURE / "instructions.json"), "--out", str(out))
    assert code == 0, err
    notices = [line for line in err.splitlines() if "warning" in line]
    assert len(notices) == 1 and "written before checkpoints stored their prompt style" in notices[0]
    assert "alpaca" in notices[0]
    answered = {r["instruction"]: r["response"] for r in expected_replies_at(out)}
    old = expected_replies(FIXTURE)
    assert [answered[r["instruction"]] for r in old] == [r["response"] for r in old]


# -- a recipe from another package ------------------------------------------------------------------


PLUGIN = '''
from typing import Literal

from finetune.recipes.instruct import Instruct, InstructConfig


class ShoutConfig(InstructConfig):
    recipe: Literal["shout"] = "shout"
    output_dir: str = "runs/shout"


class Shout(Instruct):
    """Instruction tuning on responses in capitals: a recipe that lives outside the toolkit."""

    name, Config = "shout", ShoutConfig

    def prepare(self, config):
        from dataclasses import replace

        return {split: [replace(r, output=r.output.upper()) for r in records]
                for split, records in super().prepare(config).items()}


RECIPE = Shout()
'''


def test_a_recipe_installed_from_another_package_trains_and_its_model_is_served_by_the_core(tmp_path, capsys):
    package = tmp_path / "src" / "shout_recipe"
    (package / "configs").mkdir(parents=True)  # presets: configs/ beside the recipe's module
    (package / "__init__.py").write_text(PLUGIN)
    preset = ("# Shouted answers, offline.\nrecipe: shout\nmodel:\n  name: gpt2-tiny\n  init: random\n"
              "train:\n  epochs: 1\n  batch_size: 8\n  lr: 1.0e-3\ngeneration:\n  max_new_tokens: 6\n")
    (package / "configs" / "shout_tiny.yaml").write_text(preset)
    (package / "configs" / "instruct_tiny.yaml").write_text(preset)  # named like a bundled preset
    (tmp_path / "src" / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "shout-recipe"\nversion = "0.1"\n'
        '[project.entry-points."finetune.recipes"]\nshout = "shout_recipe:RECIPE"\n'
        '[tool.setuptools]\npackages = ["shout_recipe"]\n[tool.setuptools.package-data]\nshout_recipe = ["configs/*"]\n')
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(site), str(tmp_path / "src")], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    (tmp_path / "data.json").write_text(json.dumps(bundled_records(30)))
    def finetune(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)

    listed = finetune("recipes")
    assert "\nshout:\n  instruct_tiny " in listed.stdout and "\n  shout_tiny " in listed.stdout, listed.stdout
    assert "Shouted answers, offline." in listed.stdout
    # Presets are found per recipe: each recipe reaches its own instruct_tiny, with a warning naming both packages.
    for recipe, owner in (("shout", "shout_recipe"), ("instruct", "recipes")):  # the folder holding configs/
        chosen = subprocess.run([sys.executable, "-c", "from finetune.training.registry import config_path; "
                                 f"print(config_path('instruct_tiny', '{recipe}'))"],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
        assert Path(chosen.stdout.strip()).parent.parent.name == owner, chosen
        assert "shout-recipe" in chosen.stderr and "finetune-gpt2" in chosen.stderr, chosen
    out = tmp_path / "run"
    ran = finetune("run", "shout", "--config", "shout_tiny", "--quiet", f"output_dir={out}", f"data.path={tmp_path / 'data.json'}")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert all(r["output"].isupper() or not r["output"].strip() for r in expected_replies(out))
    # Using the model needs no recipe: this process has never seen the plugin.
    assert "shout_recipe" not in sys.modules
    code, _, err = cli(capsys, "respond", str(out), "--out", str(tmp_path / "again.jsonl"))
    assert code == 0, err
    assert [r["response"] for r in expected_replies_at(tmp_path / "again.jsonl")] == [r["response"] for r in expected_replies(out)]
