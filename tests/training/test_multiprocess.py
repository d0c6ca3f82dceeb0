"""Training under `accelerate launch --num_processes 2` on CPU (gloo): it trains, metrics gather every
example exactly once, and the result matches one process with the same global batch (SMS spam, 5
classes of tickets, a classifier on an untied base). A stop signal that reaches one process stops both
with a checkpoint; a killed run resumes to exactly the uninterrupted result, each process with its own
random state."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoints.atomic import verify
from tests.conftest import SMALL, make_hf_checkpoint
from tests.helpers import cli, small_spam_file, ticket_run_args, tiny_spam_args

RUNNER = Path(__file__).parent.parent / "fault_runner.py"


def launch(*argv: str, runner: tuple[str, ...] = ()) -> list[str]:
    """`accelerate launch` of two CPU processes running the finetune CLI (or the fault runner first).
    accelerate's `--cpu` flag starts one process; its torchrun launcher (`--multi_gpu`) with
    ACCELERATE_USE_CPU starts two that talk over gloo."""
    program = [str(RUNNER), *runner] if runner else ["-m", "finetune"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            *program, *argv]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


@pytest.mark.parametrize("trainable, classes, base", [("all", 2, "gpt2-tiny"), ("last_block", 2, "gpt2-tiny"),
                                                       ("last_block", 5, "gpt2-tiny"), ("all", 2, "untied")],
                         ids=["full", "last_block_feature_cache", "5_classes_feature_cache", "full_untied_head"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, capsys, trainable, classes, base):
    # 56 training examples (7 global batches of 8: accelerate repeats examples to even out a short last
    # batch, which would differ from one process); val and test uneven, gathered exactly. Spam: 82
    # messages -> 56/9/17; tickets: 80 -> 56/8/16.
    if classes == 2:
        data = small_spam_file(tmp_path / "sms.tsv", per_label=41)
        run_args, sizes = (lambda out, *extra: tiny_spam_args(data, out, *extra)), (("train", 56), ("val", 9), ("test", 17))
    else:
        run_args = ticket_run_args(tmp_path)
        sizes = (("train", 56), ("val", 8), ("test", 16))
    common = ["train.epochs=2", "train.eval_every=3", "train.eval_batch_size=4", f"finetune.trainable={trainable}"]
    if base == "untied":  # a vocabulary head of its own, which a classifier never reads: DDP needs it frozen
        make_hf_checkpoint(tmp_path / "untied", **{**SMALL, "n_positions": 64}, tie_word_embeddings=False)
        common += [f"model.name={tmp_path / 'untied'}", "model.init=pretrained"]
    two = tmp_path / "two"
    launched = subprocess.run(launch(*run_args(two, "train.batch_size=4", *common)),
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert ("feature cache" in launched.stderr) == (trainable == "last_block"), launched.stderr[-3000:]

    one = tmp_path / "one"
    code, _, err = cli(capsys, *run_args(one, "train.batch_size=8", *common))
    assert code == 0, err

    m2, m1 = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    assert len(m2["test"]["labels"]) == classes
    assert m2["environment"] == {"mixed_precision": "no", "device": "cpu:0", "processes": 2}  # gloo names its device
    for split, n in sizes:  # gathered without duplicates or losses
        assert m2[split]["n"] == m1[split]["n"] == n
        assert sum(map(sum, m2[split]["confusion_matrix"])) == n
        assert abs(m2[split]["loss"] - m1[split]["loss"]) < 1e-5
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (two, one)]
    steps = [[r["step"] for r in run if r["split"] == "train"] for run in rows]
    assert steps[0] == steps[1] == list(range(1, 15))  # 56 / 8 = 7 steps an epoch, in both
    losses = [[r["loss"] for r in run if r["split"] == "train"] for run in rows]
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-5  # measured 2e-7; a wrong data split gives 5e-3
    last = [run / "checkpoints" / "step-0000014" for run in (two, one)]
    # Partial fine-tunes (the last block, or all but the untied head) save only their trained tensors.
    w2, w1 = (load_file(d / "model.safetensors" if (d / "model.safetensors").exists() else d / "adapter.safetensors")
              for d in last)
    if base == "untied":
        assert "gpt.lm_head.weight" not in w1 and "gpt.wte.weight" in w1
    # Summation order differs across processes. One step moves a weight by about lr (1e-3) under Adam;
    # every weight agrees to well below that (measured <= 1.1e-5, the rarest token embeddings), except
    # the key part of the qkv bias: softmax ignores a shift shared by all keys, so its exact gradient is 0
    # and Adam scales the rounding noise up to lr-sized steps (measured 1e-4).
    n_embd = 64 if base == "gpt2-tiny" else SMALL["n_embd"]
    for name in w1:
        diff = (w2[name] - w1[name]).abs()
        if name.endswith("attn.qkv.bias"):
            assert diff[n_embd:2 * n_embd].max().item() < 1e-3, name
            diff = torch.cat([diff[:n_embd], diff[2 * n_embd:]])
        assert diff.max().item() < 3e-5, name


# Dropout makes each process's random state part of what a resume must restore. 7 steps an epoch.
INTERRUPTIBLE = ("train.batch_size=4", "model.dropout=0.1", "train.checkpoint_every=3", "train.keep_last=2",
                 "train.eval_every=4")


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    return small_spam_file(tmp_path_factory.mktemp("data") / "sms.tsv", per_label=41)


@pytest.fixture(scope="module")
def uninterrupted(spam, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(launch(*tiny_spam_args(spam, out, *INTERRUPTIBLE)), capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def start_paused(point: str, out: Path, spam: Path, tmp_path: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """Both processes running, paused (or slowed) at `point`; returns the launcher and each rank's pid."""
    marker = tmp_path / point
    process = subprocess.Popen(launch(*tiny_spam_args(spam, out, *INTERRUPTIBLE), runner=(point, str(marker))),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 180
    markers = [marker.with_name(f"{point}.rank{rank}") for rank in (0, 1)]
    while not all(m.exists() and m.read_text() for m in markers):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the planted point was never reached"
        time.sleep(0.05)
    return process, {rank: int(m.read_text()) for rank, m in enumerate(markers)}


def resume_and_compare(spam: Path, out: Path, uninterrupted: Path) -> None:
    resumed = subprocess.run(launch(*tiny_spam_args(spam, out, *INTERRUPTIBLE, "resume=true")),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for kept in ("best", "checkpoints/step-0000014"):
        a, b = (load_file(run / kept / "model.safetensors") for run in (out, uninterrupted))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kept
    assert (out / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((uninterrupted / "metrics.json").read_text())


def test_sigterm_to_one_process_stops_both_with_a_checkpoint(spam, uninterrupted, tmp_path):
    """Only rank 1 gets SIGTERM (a node's scheduler, one killed worker): both agree to stop at the same
    step through the all-reduce every step makes, save, and exit; nothing waits forever."""
    out = tmp_path / "run"
    process, pids = start_paused("slow", out, spam, tmp_path)
    os.kill(pids[1], signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("one process's SIGTERM left the run hanging") from None
    assert process.returncode != 0 and "SIGTERM at step" in err, err[-3000:]
    step = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert 4 < step < 14
    verify(out / "checkpoints" / f"step-{step:07d}")
    resume_and_compare(spam, out, uninterrupted)


def test_killed_run_resumes_to_the_uninterrupted_result(spam, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process, pids = start_paused("mid-epoch", out, spam, tmp_path)  # both paused after step 8
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000006", "step-0000007"]
    resume_and_compare(spam, out, uninterrupted)
