"""The text recipe: the book's windows, tokenization in blocks, the token-file cache, runs end to end."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from finetune.datasets import THE_VERDICT, bundled
from safetensors.torch import load_file

import finetune.data.corpus as corpus
from finetune.errors import UserError
from finetune.model.tokenizer import get_tokenizer
from tests.helpers import assert_same_files, cli, one_line_error, run_killed_and_resumed

VERDICT = bundled(THE_VERDICT).read_text(encoding="utf-8")


def book_windows(text: str, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """The book's GPTDatasetV1 (chapter 2), written again here from the book."""
    token_ids = get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})  # GPT-2's BPE (tests/model/test_tokenizer.py)
    pairs = []
    for i in range(0, len(token_ids) - max_length, stride):
        pairs.append((token_ids[i : i + max_length], token_ids[i + 1 : i + max_length + 1]))
    return pairs


def tokenize(tmp_path, paths, val_fraction=0.1, text_field="text", fmt=None):
    return corpus.tokenized(corpus.find_sources([str(p) for p in paths], fmt), text_field, val_fraction, tmp_path / "cache")


def ours(windows: corpus.Windows) -> list[tuple[list[int], list[int]]]:
    batch = corpus.collate_windows([windows[i] for i in range(len(windows))])
    assert batch["count"] == batch["targets"].numel()
    return list(zip(batch["input_ids"].tolist(), batch["targets"].tolist()))


@pytest.mark.parametrize("max_length, stride", [(256, 256), (64, 16), (4, 1), (100, 37)])
def test_windows_are_the_books_for_the_verdict(tmp_path, max_length, stride):
    """Train and validation windows equal GPTDatasetV1 on the book's 90/10 character split."""
    data = tokenize(tmp_path, [bundled(THE_VERDICT)])
    split_idx = int(0.90 * len(VERDICT))
    for split, text in (("train", VERDICT[:split_idx]), ("val", VERDICT[split_idx:])):
        expected = book_windows(text, max_length, stride)
        assert expected and ours(corpus.Windows(data.tokens(split), max_length, stride)) == expected, split
    assert data.manifest["split"] == "characters"


TRICKY = ("def f(x):\n    return  x  +  1\n\n\n\tindented\r\n" + "é ü 日本語 ‘quotes’ — dashes " * 3 + "x" * 300
          + " it's 2024, isn't it?  (yes)\u00a0nbsp\u3000wide 42 3.14 <|endoftext|> next doc " + "a b  c   ")


def random_text(n: int, seed: int) -> str:
    """Runs of every kind of whitespace between words, numbers, punctuation and contractions."""
    pieces = ["word", "Élan", "42", "3.14", ".", ",", "'s", "'", "(", "-", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\u00a0"]
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(pieces, size=n))


@pytest.mark.parametrize("block", [3, 7, 50, 997])
def test_blocks_tokenize_to_what_the_whole_text_does(tmp_path, monkeypatch, block):
    """Text is read and tokenized in blocks cut at safe places: the ids equal one encode of the whole text."""
    from finetune.model.tokenizer import encode

    text = VERDICT[:5000] + TRICKY + random_text(4000, block) + TRICKY
    path = tmp_path / "tricky.txt"
    path.write_text(text, encoding="utf-8", newline="")
    monkeypatch.setattr(corpus, "BLOCK_CHARS", block)
    data = tokenize(tmp_path, [path], val_fraction=0.25)
    universal = text.replace("\r\n", "\n")  # read as text, as the book does: newlines made \n
    cut = int(len(universal) * 0.75)
    assert data.tokens("train").tolist() == encode(universal[:cut])
    assert data.tokens("val").tolist() == encode(universal[cut:])


def test_several_documents_are_joined_with_end_of_text_and_split_by_document(tmp_path):
    from finetune.model.tokenizer import EOT_ID, encode

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = [f"Document {i}: " + VERDICT[i * 300 : i * 300 + 250] for i in range(10)]
    for i, text in enumerate(texts):
        (docs / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(text)
    (docs / "notes.md").write_text("not a .txt file: a directory means its .txt files")
    data = tokenize(tmp_path, [docs])
    order = sorted(docs.rglob("*.txt"))  # sub/ files sort after the top-level ones
    ordered = [p.read_text() for p in order]

    def joined(parts):
        return [t for i, part in enumerate(parts) for t in ([EOT_ID] if i else []) + encode(part)]

    assert data.manifest["split"] == "documents" and data.manifest["documents"] == {"train": 9, "val": 1}
    assert data.tokens("train").tolist() == joined(ordered[:9])
    assert data.tokens("val").tolist() == joined(ordered[9:])
    by_glob = tokenize(tmp_path, [docs / "**" / "*.txt"])
    assert by_glob.directory == data.directory  # the same files in the same order: the same cache entry


def test_a_text_column_of_any_table_format_gives_the_same_tokens(tmp_path):
    frame = pd.DataFrame({"id": range(6), "body": [VERDICT[i * 500 : i * 500 + 400] for i in range(6)]})
    frame.to_csv(tmp_path / "docs.csv", index=False)
    frame.to_json(tmp_path / "docs.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "docs.parquet")
    results = [tokenize(tmp_path, [tmp_path / f"docs.{ext}"], text_field="body") for ext in ("csv", "jsonl", "parquet")]
    for split in ("train", "val"):
        assert len({tuple(r.tokens(split).tolist()) for r in results}) == 1
    assert results[0].manifest["documents"] == {"train": 5, "val": 1}


def test_token_files_are_reused_and_never_stale(tmp_path, monkeypatch):
    path = tmp_path / "story.txt"
    path.write_text(VERDICT)
    first = tokenize(tmp_path, [path])
    before = first.tokens("train").tolist()

    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(corpus, "_write_splits", no_tokenizing)
        assert tokenize(tmp_path, [path]).directory == first.directory

    path.write_text(VERDICT.replace("Gisburn", "Gisborne"))  # the source changed: a new entry
    changed = tokenize(tmp_path, [path])
    assert changed.directory != first.directory and changed.tokens("train").tolist() != before

    train_bin = changed.directory / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-10])  # a damaged entry is noticed and rebuilt
    with pytest.warns(UserWarning, match="do not match their sources; tokenizing again"):
        again = tokenize(tmp_path, [path])
    assert again.tokens("train").tolist() == changed.tokens("train").tolist()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "nul.txt").write_bytes(b"text\x00\x00with nul bytes")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "nodocs").mkdir()
    cases = {"empty.txt": "empty.txt: empty file", "nul.txt": "nul.txt: binary file",
             "latin1.txt": "latin1.txt: not UTF-8 text", "nodocs": "nodocs: directory holds no .txt files",
             "*.nothing": "matches no file", "absent.txt": "absent.txt: no such file"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            tokenize(tmp_path, [tmp_path / name])
    assert not [p for p in (tmp_path / "cache").iterdir()]  # nothing half-written is left to be reused


# -- runs through the CLI ----------------------------------------------------------------------


def tiny_text_args(out, *extra):
    return ["run", "text", "--config", "text_tiny", f"output_dir={out}", f"data.cache_dir={out.parent / 'cache'}",
            "train.epochs=2", "train.eval_every=5", *extra]


def test_tiny_text_run_reports_and_generates(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, *tiny_text_args(out))
    assert code == 0, err
    assert "text: 4,612 train and 534 val tokens (split by characters), 72 windows of 64 every 64" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["tokens"] == 512 and metrics["train"]["tokens"] == 72 * 64
    assert metrics["sample"]["text"].startswith("Every effort moves you") and repr(metrics["sample"]["text"]) in stdout
    assert metrics["val"]["perplexity"] == pytest.approx(np.exp(metrics["val"]["loss"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["tokens_seen"] for r in train_rows] == [512 * (i + 1) for i in range(18)]  # 9 batches of 8 x 64 an epoch
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val_rows] == [0, 5, 9, 10, 15, 18]  # at start, every 5 steps, at epoch ends
    assert all(r["sample"].startswith("Every effort moves you") for r in val_rows)
    assert err.count("sample: 'Every effort moves you") == len(val_rows)
    report = (out / "report.md").read_text()
    assert (out / "curves.png").stat().st_size > 0 and "\nval " in report and "## Sample" in report
    code, stdout, err = cli(capsys, "generate", "--model", str(out), "--prompt", "Every effort", "--max-new-tokens", "5")
    assert code == 0 and stdout.strip(), err  # the continuation of the prompt


def test_interrupted_and_resumed_text_run_ends_bit_identical(tmp_path, capsys, monkeypatch):
    extra = ("--quiet", "model.dropout=0.1", "train.checkpoint_every=4", "train.epochs=2")
    full, cut = run_killed_and_resumed(capsys, monkeypatch, lambda out: tiny_text_args(out, *extra), tmp_path,
                                       checkpoints_before_kill=1)  # step 4 of 9, mid-epoch
    assert_same_files(full, cut, ("best/model.safetensors", "checkpoints/step-0000018/model.safetensors"),
                      ("metrics.jsonl", "metrics.json"))


def test_lora_text_run_saves_only_the_adapter(tmp_path, capsys):
    out = tmp_path / "lora"
    code, _, err = cli(capsys, *tiny_text_args(out, "--quiet", "finetune.trainable=lora", "train.epochs=1"))
    assert code == 0, err
    stored = load_file(out / "best" / "adapter.safetensors")
    assert stored and all("lora_" in name for name in stored)
    assert not (out / "best" / "model.safetensors").exists()
    assert cli(capsys, "generate", "--model", str(out), "--prompt", "Every", "--max-new-tokens", "3")[0] == 0


@pytest.mark.parametrize("extra, message", [
    (("data.max_length=2000",), "data.max_length=2000 is beyond the model's context of 256 tokens"),
    (("data.max_length=64", "data.stride=65"), "stride 65 > max_length 64"),
    (("data.max_length=null", "data.stride=300"), "data.stride=300 > data.max_length=256"),
    (("data.stride=0",), "data.stride"),
    (("data.val_fraction=0.02", "data.max_length=256"), r"the val split has \d+ tokens; data.max_length=256 needs at least 257"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, extra, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = one_line_error(capsys, *tiny_text_args(tmp_path / "run", "--quiet", *extra))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_book_init_is_the_books_gptmodel_init():
    """model.init=book: what the book's chapter 5 trains from (its GPTModel's PyTorch-default init)."""
    from llms_from_scratch.ch04 import GPTModel

    from finetune.formats.loading import build_model

    torch.manual_seed(0)
    ours = build_model("gpt2-tiny", "book")
    book = GPTModel({"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                     "drop_rate": 0.0, "qkv_bias": True})
    assert ours.lm_head.weight is not ours.wte.weight and ours.num_parameters() == sum(p.numel() for p in book.parameters())
    for mine, theirs in ((ours.wte.weight, book.tok_emb.weight), (ours.wpe.weight, book.pos_emb.weight),
                         (ours.lm_head.weight, book.out_head.weight), (ours.blocks[0].mlp.fc.weight, book.trf_blocks[0].ff.layers[0].weight)):
        assert mine.std().item() == pytest.approx(theirs.std().item(), rel=0.05)
        assert mine.abs().max().item() == pytest.approx(theirs.abs().max().item(), rel=0.3)
