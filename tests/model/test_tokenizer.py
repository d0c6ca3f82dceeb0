"""Our offline tokenizer gives tiktoken's gpt2 ids, with the network unavailable."""

import hashlib
import shutil

import tiktoken

from finetune.model.tokenizer import ASSETS, EOT_ID, encode, get_tokenizer

URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
SAMPLES = [
    "Hello, world!",
    "  leading and trailing whitespace   \n\n\t tabs\r\n",
    "Unicode: héllo wörld, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский",
    "Numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "one<|endoftext|>two <|endoftext|>",
    "it's don't I'll we've THEY'RE",
    "",
]


def test_ids_equal_tiktoken_gpt2_offline(tmp_path, monkeypatch, no_network):
    # tiktoken's own gpt2 encoding, its downloads served from a cache holding the same files.
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(ASSETS / name, tmp_path / hashlib.sha1((URL + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("gpt2")
    ours = get_tokenizer()
    for text in SAMPLES:
        assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
        assert ours.decode(ours.encode(text, allowed_special="all")) == text
    assert ours.n_vocab == reference.n_vocab == 50257


def test_end_of_text_is_50256():
    assert encode("<|endoftext|>") == [EOT_ID] == [50256]
