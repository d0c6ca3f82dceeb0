"""What every benchmark script shares: the CPU it names, the matmul peak it reports against, and running
one case in a fresh process so that the peak memory it reports is that case's own."""

from __future__ import annotations

import json
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch


def cpu_name() -> str:
    """The CPU model (results are comparable only on the same one)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


GPT2_MATMUL = (1024, 768, 3072)  # 1,024 tokens through GPT-2 124M's MLP up-projection


def matmul_peak(precision: str, shape: tuple[int, int, int] = (2048, 2048, 2048), repeats: int = 5) -> float:
    """GFLOP/s of an (m x k) by (k x n) matmul on this machine: a large square one by default, or
    GPT2_MATMUL, the shape the model's own products have; the median of `repeats` after a warm-up."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def peak_mib() -> float:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_own_process(script: str, *args: str) -> dict | str:
    """Run `script` with `args` in a new Python: the JSON object it printed last, or its last error line."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def served_server(preset: str, max_batch: int, log_level: str = "warning"):
    """A uvicorn server (not yet running) with `finetune serve`'s app over a seeded random model of
    `preset`, on a free port of 127.0.0.1, and that port."""
    import uvicorn

    from finetune import GPT, GPTConfig
    from finetune.inference.loading import Loaded
    from finetune.serve.app import create_app

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset)).eval()
    app = create_app(Loaded.of(model, model.checkpoint_meta(), preset), max_batch=max_batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level)), port
