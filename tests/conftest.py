"""Shared fixtures: checkpoints in the real Hugging Face layout, made by transformers from random weights."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

SMALL = dict(n_embd=60, n_layer=3, n_head=5, n_positions=97)  # odd head count, non-default context
GPT2_124M = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)


def make_hf_checkpoint(directory: Path, seed: int = 0, **config):
    """A transformers GPT-2 whose every tensor is random and distinct, saved as config.json + model.safetensors.

    transformers' own initialisation sets every bias to 0 and every LayerNorm to weight 1, bias 0: a
    loader that swapped ln_1 and ln_2, or two biases, would still give the right logits on it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):  # below the embeddings' 0.02, or they would drown the tokens
                p.copy_(0.01 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def small_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small_hf")
    return directory, make_hf_checkpoint(directory, **SMALL)


@pytest.fixture(scope="session")
def gpt2_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_hf")
    return directory, make_hf_checkpoint(directory, **GPT2_124M)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
