"""Conversations: what a chat run trains on is what transformers' `apply_chat_template` gives on its export, token
for token, with exactly the assistant turns trained on; a trained chat model answers a conversation the same
through `reply`, `finetune chat`, `finetune serve`, transformers and llama.cpp; OpenAI, ShareGPT and `messages`
records read alike, and bad ones are counted per kind or refused."""

from __future__ import annotations

import builtins
import json
import random
from pathlib import Path

import pytest
import torch
from finetune.datasets import CONVERSATIONS, CONVERSATIONS_SHAREGPT, INSTRUCTIONS, bundled

import finetune.data.conversations as conversations_module
from finetune.checkpoints.atomic import write_directory
from finetune.checkpoints.interface import Generation, interface_meta, interface_of
from finetune.checkpoints.model_files import model_files
from finetune.cli import main
from finetune.data.conversations import Screening, encode_conversation, encode_screened, read_conversations
from finetune.data.prompts import chat_template, format_conversation, format_prompt, user_message
from finetune.formats.loading import load_with_meta
from finetune.inference.respond import conversation_tokens, reply
from finetune.model.gpt import GPT, GPTConfig
from finetune.model.tokenizer import get_tokenizer
from finetune.serve.app import create_app
from finetune.inference.loading import Loaded
from tests.serve.test_serve import Running, client

END = {"chatml": "<|im_end|>\n", "alpaca": "<|endoftext|>", "phi3": "<|endoftext|>"}
# A user's Jinja chat template (Zephyr's shape), its end marker the end-of-text token
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
END[ZEPHYR] = "<|endoftext|>\n"  # the template writes a newline after every message
FORMATS = ["chatml", "alpaca", "phi3", ZEPHYR]
FORMAT_IDS = ["chatml", "alpaca", "phi3", "jinja"]


def twenty_conversations() -> list[list[dict]]:
    """1 to 4 turns, every other one with a system message, some user turns as instruction and input parts
    (not for the Jinja template, which reads string contents), made from the bundled instructions."""
    records = json.loads(bundled(INSTRUCTIONS).read_text())
    rng = random.Random(0)
    out, k = [], 0
    for i in range(20):
        messages = [{"role": "system", "content": rng.choice(["Be brief.", "You are a tutor.\nExplain."])}] if i % 2 else []
        for _ in range(1 + i % 4):
            r = records[k]
            k += 1
            messages += [user_message(r["instruction"], r["input"]), {"role": "assistant", "content": r["output"]}]
        out.append(messages)
    return out


def as_strings(messages: list[dict]) -> list[dict]:
    """Content parts joined (how a template that reads strings is sent them)."""
    return [m | {"content": m["content"] if isinstance(m["content"], str) else "\n\n".join(p["text"] for p in m["content"])}
            for m in messages]


def export_for(style: str, root: Path) -> Path:
    model = GPT(GPTConfig.from_preset("gpt2-tiny"))
    write_directory(root / "ckpt", model_files(model, interface_meta(style, Generation(max_new_tokens=8), seed=1)))
    assert main(["export", str(root / "ckpt"), str(root / "hf")]) == 0
    return root / "hf"


def mask_problems(ids: list[int], trained: list[bool], messages: list[dict], end: str) -> list[str]:
    """Independently of how spans are found: the trained tokens form one run per trained assistant turn, each
    decoding to exactly that turn's content and the format's end marker."""
    decode = get_tokenizer().decode
    runs, current = [], []
    for token, on in zip(ids, trained):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    wanted = [m["content"] + end for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
    got = [decode(run) for run in runs]
    return [] if got == wanted else [f"trained {got!r}, wanted {wanted!r}"]


@pytest.mark.parametrize("style", FORMATS, ids=FORMAT_IDS)
def test_tokens_equal_transformers_chat_template_and_the_mask_is_the_assistant_turns(style, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_for(style, tmp_path))
    assert tokenizer.chat_template == chat_template(style)
    for messages in twenty_conversations():
        messages = as_strings(messages) if style == ZEPHYR else messages
        encoded = encode_conversation(style, messages)
        theirs = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert encoded.ids == list(theirs)
        assert mask_problems(encoded.ids, encoded.trained, as_strings(messages), END[style]) == []
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        assert prompt == format_conversation(style, messages[:-1])
    if style != ZEPHYR:  # one user message renders as the instruct recipe's prompt
        assert format_conversation(style, [user_message("Add.", "1+1")]) == format_prompt(style, "Add.", "1+1")


def test_a_planted_off_by_one_in_the_assistant_spans_is_caught(monkeypatch):
    real = conversations_module.assistant_spans

    def shifted(source, messages):
        text, spans = real(source, messages)
        return text, [(start - 1, end - 1, i) for start, end, i in spans]

    messages = twenty_conversations()[3]
    good = encode_conversation("chatml", messages)
    assert mask_problems(good.ids, good.trained, as_strings(messages), END["chatml"]) == []
    monkeypatch.setattr(conversations_module, "assistant_spans", shifted)
    bad = encode_conversation("chatml", messages)
    assert mask_problems(bad.ids, bad.trained, as_strings(messages), END["chatml"]) != []


def test_loss_on_the_last_turn_on_everything_and_weight_zero():
    messages = twenty_conversations()[2]  # three turns
    last = encode_conversation("alpaca", messages, "last")
    decode = get_tokenizer().decode
    assert decode([t for t, on in zip(last.ids, last.trained) if on]) == messages[-1]["content"] + "<|endoftext|>"
    assert all(encode_conversation("alpaca", messages, "all").trained)
    weighted = [dict(m, weight=0) if m["role"] == "assistant" and i < 4 else m for i, m in enumerate(messages)]
    skipped = encode_conversation("alpaca", weighted)
    assert mask_problems(skipped.ids, skipped.trained, as_strings(weighted), END["alpaca"]) == []
    assert sum(skipped.trained) < sum(encode_conversation("alpaca", messages).trained)


def test_sharegpt_and_openai_files_read_the_same():
    openai = read_conversations(bundled(CONVERSATIONS), None, None, strict=False)
    sharegpt = read_conversations(bundled(CONVERSATIONS_SHAREGPT), None, None, strict=False)
    assert len(openai.kept) == len(sharegpt.kept) == 550 and not openai.counts and not sharegpt.counts
    assert [c.messages for c in openai.kept] == [c.messages for c in sharegpt.kept]
    assert sum(c.messages[0]["role"] == "system" for c in openai.kept) == 413  # three in four


BAD = {
    "malformed": {"messages": "hello"},
    "role": {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "content": {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
    "weight": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
    "order": {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                           {"role": "assistant", "content": "z"}]},
    "no_assistant": {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]},
    "ends_with_user": {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                    {"role": "user", "content": "z"}]},
    "too_long": {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "y"}]},
}


def bad_file(tmp_path: Path) -> Path:
    good = [json.loads(line) for line in bundled(CONVERSATIONS).read_text().splitlines()[:30]]
    rows = good[:10] + list(BAD.values()) + [BAD["role"]] + good[10:]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_records_are_counted_per_kind_or_refused(tmp_path):
    path = bad_file(tmp_path)
    screening = read_conversations(path, None, None, strict=False)
    kept = encode_screened(screening.kept, "chatml", "assistant", 256, screening)
    assert len(kept) == 30
    assert dict(screening.counts) == {kind: 2 if kind == "role" else 1 for kind in BAD}
    lines = screening.lines()
    assert len(lines) == len(BAD) and lines[0].startswith("skipped 2 conversation(s) with a message with a role")
    assert f"{path}:12 (message 1: 'tool')" in lines[0]
    with pytest.raises(Exception, match=rf"^{path}:11: not a list of message objects; fix the record, or set "
                                         "data.strict=false"):
        read_conversations(path, None, None, strict=True)


def test_a_strict_run_refuses_a_bad_record_in_one_line(tmp_path, capsys):
    path = bad_file(tmp_path)
    code = main(["run", "chat", "--config", "chat_tiny", f"output_dir={tmp_path / 'run'}", f"data.path={path}",
                 "data.strict=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"{path}:11" in err and not (tmp_path / "run").exists()


# -- a trained chat model answers the same everywhere ---------------------------------------------


@pytest.fixture(scope="module", params=["chatml", "alpaca"])
def chat_run(request, tmp_path_factory):
    """A tiny model trained on 24 conversations until it answers in words; in alpaca its replies end at
    end-of-text before the 16-token budget (a tiny model does not learn chatml's 6-token end marker whole)."""
    root = tmp_path_factory.mktemp(f"chat_{request.param}")
    lines = bundled(CONVERSATIONS).read_text().splitlines()[:24]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["run", "chat", "--quiet", "--config", "chat_tiny", f"output_dir={root / 'run'}",
                 f"data.path={root / 'data.jsonl'}", f"data.chat_format={request.param}", "train.epochs=25",
                 "train.batch_size=4", "train.eval_every=0", "train.eval_at_start=false", "train.lr=3e-3",
                 "generation.max_new_tokens=16", "data.train_on=assistant"]) == 0
    assert main(["export", str(root / "run"), str(root / "hf")]) == 0
    assert main(["export", str(root / "run"), str(root / "gguf"), "--format", "gguf"]) == 0
    return root


def test_a_multi_turn_conversation_gets_one_answer_everywhere(chat_run, monkeypatch, capsys):
    """`finetune chat` (keeping the conversation), the server (whole `messages`), transformers' chat path on the
    export and llama.cpp's chat completion on the GGUF: the same greedy second answer."""
    model, meta = load_with_meta(chat_run / "run")
    model.eval()
    style, generation = meta["prompt_style"], interface_of(meta).generation
    assert generation.stop == (["<|im_end|>"] if style == "chatml" else [])
    first, second = "Name a fruit.", "What is the capital of Italy?"
    system = {"role": "system", "content": "Be brief."}
    answer = reply(model, [[system, {"role": "user", "content": first}]], style, generation)[0]
    messages = [system, {"role": "user", "content": first}, {"role": "assistant", "content": answer},
                {"role": "user", "content": second}]
    ours = reply(model, [messages], style, generation)[0]
    lines = iter([first, second])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines, ""))
    assert main(["chat", str(chat_run / "run"), "--system", "Be brief."]) == 0
    assert capsys.readouterr().out == f"{answer}\n{ours}\n"  # the second answer saw the first exchange
    assert ours != reply(model, [[system, messages[-1]]], style, generation)[0]
    if style == "alpaca":  # ended at end-of-text, not at the budget
        assert len(get_tokenizer().encode_ordinary(ours)) < generation.max_new_tokens
    # the server
    running = Running(create_app(Loaded.of(model, meta, "chat")))
    try:
        served = client(running.url).chat.completions.create(model="chat", messages=messages, temperature=0)
    finally:
        running.close()
    assert served.choices[0].message.content == ours
    # transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_run / "hf")
    hf = AutoModelForCausalLM.from_pretrained(chat_run / "hf").eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=generation.max_new_tokens, do_sample=False, tokenizer=tokenizer,
                          pad_token_id=50256)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.split("<|im_end|>")[0].strip() == ours
    # llama.cpp
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(chat_run / "gguf" / "model.gguf"), n_ctx=256, verbose=False, n_threads=2, seed=0)
    answer = llm.create_chat_completion(messages, temperature=0.0, top_k=1, max_tokens=generation.max_new_tokens,
                                        stop=generation.stop)
    assert answer["choices"][0]["message"]["content"].strip() == ours
    assert answer["usage"]["prompt_tokens"] == len(conversation_tokens(messages, style))  # the same prompt


def test_respond_and_score_read_a_chat_runs_replies(chat_run, tmp_path, capsys):
    """`finetune respond RUN` answers the run's test conversations again, as the run did; `finetune score` reads
    them; a file of conversations ending with the assistant's reference is answered up to its last question."""
    again = tmp_path / "again.jsonl"
    assert main(["respond", str(chat_run / "run"), "--out", str(again)]) == 0
    assert again.read_text() == (chat_run / "run" / "responses.jsonl").read_text()
    assert main(["score", str(again), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == len(again.read_text().splitlines())
    out = tmp_path / "asked.jsonl"
    assert main(["respond", str(chat_run / "run"), "--data", str(chat_run / "data.jsonl"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sources = [json.loads(line)["messages"] for line in (chat_run / "data.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in rows] == [m[:-1] for m in sources]
    assert [r["output"] for r in rows] == [m[-1]["content"] for m in sources]


def test_the_server_refuses_what_the_format_cannot_hold(chat_run):
    model, meta = load_with_meta(chat_run / "run")
    running = Running(create_app(Loaded.of(model.eval(), meta, "chat")))
    try:
        api = client(running.url)
        from openai import BadRequestError

        for messages in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                         [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                          {"role": "user", "content": "c"}]):
            with pytest.raises(BadRequestError, match="cannot hold this conversation: roles must alternate"):
                api.chat.completions.create(model="chat", messages=messages)
        card = api.models.list().data[0]
        assert card.prompt_style == meta["prompt_style"] and card.multi_turn is True
    finally:
        running.close()


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_a_one_turn_conversation_trains_exactly_as_an_instruct_record(style):
    """Every bundled instruction as a one-turn conversation: the chat recipe's row (inputs and targets) is the
    instruct recipe's with mask_prompt, token for token (tokenizing the whole text splits it as the instruct
    recipe's separate prompt and response do)."""
    from finetune.data.records import Record
    from finetune.recipes.chat import TurnsCollate
    from finetune.recipes.instruct import Collate, encode

    for r in json.loads(bundled(INSTRUCTIONS).read_text()):
        instruct_row = Collate(1024, mask_prompt=True).row(encode([Record(r["instruction"], r["input"], r["output"])],
                                                                  style)[0])
        messages = [user_message(r["instruction"], r["input"]), {"role": "assistant", "content": r["output"]}]
        assert TurnsCollate(1024).row(encode_conversation(style, messages)) == instruct_row


def test_a_packed_chat_run_starts_where_an_unpacked_one_does(tmp_path, capsys):
    """Conversations packed into rows (TurnsCollate inside PackedCollate): the start's validation loss is the
    unpacked run's, and training runs."""
    lines = bundled(CONVERSATIONS).read_text().splitlines()[:40]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    losses = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        assert main(["run", "chat", "--quiet", "--config", "chat_tiny", f"output_dir={out}", f"data.packing={packing}",
                     f"data.path={tmp_path / 'data.jsonl'}", "train.epochs=1", "generation.max_new_tokens=4"]) == 0
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and first["split"] == "val"
        losses[packing] = first["loss"]
    assert "packed in" in capsys.readouterr().err
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
