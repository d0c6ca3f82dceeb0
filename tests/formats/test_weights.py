"""Loading from every supported layout, and one-line errors for everything that cannot load."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from finetune import load_pretrained
from finetune.cli import main

IDX = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDX)


def book_model(qkv_bias: bool = True):
    """The book's own `GPTModel` (its published package, llms-from-scratch) in the gpt2-tiny shape, with
    every tensor random and distinct: LayerNorm scales and shifts, biases, embeddings, the head."""
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": qkv_bias}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if name.endswith((".scale", ".shift", ".bias")) else 0.05)
                    + (1.0 if name.endswith(".scale") else 0.0))
    return model


def test_book_pth_gives_the_book_models_logits(tmp_path):
    book = book_model()
    torch.save(book.state_dict(), tmp_path / "book.pth")  # how the book saves a model (chapter 5)
    ours = load_pretrained(tmp_path / "book.pth")
    assert not ours.config.tie_embeddings  # the book's out_head is its own matrix
    with torch.no_grad():
        assert (logits(ours) - book(IDX)).abs().max().item() <= 1e-5


def test_book_training_checkpoint_without_qkv_bias(tmp_path):
    book = book_model(qkv_bias=False)
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": {}}, tmp_path / "model_and_optimizer.pth")
    loaded = load_pretrained(tmp_path / "model_and_optimizer.pth")
    assert all(torch.equal(block.attn.qkv.bias, torch.zeros_like(block.attn.qkv.bias)) for block in loaded.blocks)
    with torch.no_grad():
        assert (logits(loaded) - book(IDX)).abs().max().item() <= 1e-5


def test_pytorch_model_bin_directory(tmp_path, small_hf):
    directory, hf = small_hf
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with torch.no_grad():
        assert (logits(load_pretrained(tmp_path)) - hf(IDX).logits).abs().max() <= 1e-5


def _cli_error(capsys, *argv):
    code = main(["generate", "--prompt", "hi", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_checkpoints_fail_with_one_line(tmp_path, small_hf, capsys):
    assert "no such file or directory" in _cli_error(capsys, "--model", str(tmp_path / "missing"))

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "no weights file" in _cli_error(capsys, "--model", str(tmp_path / "empty"))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((small_hf[0] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((small_hf[0] / "model.safetensors").read_bytes()[:5000])
    assert "corrupt or truncated" in _cli_error(capsys, "--model", str(corrupt))

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((small_hf[0] / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_embd": 80, "n_head": 4}))
    (wrong / "model.safetensors").write_bytes((small_hf[0] / "model.safetensors").read_bytes())
    err = _cli_error(capsys, "--model", str(wrong))
    assert "shape mismatch (" in err and "blocks.0.ln_1.weight (60,) != (80,)" in err

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text(json.dumps(config))
    save_file({"surprise.weight": torch.zeros(2)}, extra / "model.safetensors")
    err = _cli_error(capsys, "--model", str(extra))
    assert "missing (" in err and "unexpected (1): surprise.weight" in err

    (tmp_path / "bad.json").mkdir()
    (tmp_path / "bad.json" / "config.json").write_text("{not json")
    assert "not valid JSON" in _cli_error(capsys, "--model", str(tmp_path / "bad.json"))


def test_hub_id_offline_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "generate", "--model", "gpt2", "--prompt", "hi"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "local directory" in result.stderr and "model.init=random" in result.stderr


MEMORY_PROBE = """
import sys, threading, time
from finetune import load_pretrained

def rss_anon():  # resident anonymous memory: allocations, not file pages of the checkpoint
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [rss_anon()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)
base = rss_anon()
sampler = threading.Thread(target=sample)
sampler.start()
model = load_pretrained(sys.argv[1])
done.set()
sampler.join()
print(max(peak[0], rss_anon()) - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_loading_124m_peaks_near_one_copy(gpt2_hf):
    """Peak memory while loading stays near one copy of the weights, and the model owns its memory."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(gpt2_hf[0])], capture_output=True, text=True, check=True)
    ratio = int(result.stdout) / (124_439_808 * 4)
    assert 0.95 < ratio < 1.4, f"loading held {ratio:.2f}x the weights in memory"
