"""Shared by the benchmarks: the anchors' GPT model and data, step timing, result files."""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402

# The anchors' GPT-2-like model (../shared/anchors/RESULTS.md): 27.37M parameters.
ANCHOR = GPTConfig(vocab=8192, seq=128, layers=6, hidden=512, heads=8)
OUT = os.path.join(ROOT, "benchmarks", "out")


def build_model(cfg: GPTConfig = ANCHOR, seed: int = 1234) -> GPT:
    import torch

    torch.manual_seed(seed)
    return GPT(cfg)


def batch(step: int, size: int, cfg: GPTConfig = ANCHOR):
    return synthetic_batch(step, size, cfg.seq, cfg.vocab)


ANCHORS_DIR = os.path.join(ROOT, "..", "shared", "anchors")


@functools.lru_cache(maxsize=1)
def anchors_bench():
    """The anchors' own bench.py as a module: their exact model (qkv bias, init order) and data, so a
    loss can be compared with the numbers in ../shared/anchors/RESULTS.md."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("anchors_bench", os.path.join(ANCHORS_DIR, "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_anchors_model(seed: int = 1234):
    import torch

    ab = anchors_bench()
    torch.manual_seed(seed)
    model = ab.GPT(ANCHOR.vocab, ANCHOR.seq, ANCHOR.hidden, ANCHOR.heads, ANCHOR.layers)
    ab.init_weights(model)
    return model


def anchors_batch(step: int, size: int, seed: int = 1234):
    """Step ``step`` counts from 0 here; the anchors' script counts from 1."""
    from types import SimpleNamespace

    args = SimpleNamespace(seed=seed, global_batch=size, seq=ANCHOR.seq, vocab=ANCHOR.vocab)
    return anchors_bench().batch_for_step(step + 1, args)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def append_result(name: str, row: dict) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{name}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(name: str) -> list[dict]:
    path = os.path.join(OUT, f"{name}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def launch(nprocs: int, script: str, *args: str, env: dict | None = None, results: str | None = None) -> None:
    """Run ``script`` on ``nprocs`` local ranks. With ``results``: a failed exit is forgiven when the
    run appended its row to that results file (torch 2.13's gloo can abort a rank at interpreter
    exit, "terminate called without an active exception", after an otherwise complete run)."""
    before = len(read_results(results)) if results else 0
    import socket

    with socket.socket() as sock:  # other jobs on the machine may hold the launcher's default port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", str(nprocs), "--no_local_rank",
           "--master_port", str(port), script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if p.returncode != 0 and not (results and len(read_results(results)) > before):
        raise subprocess.CalledProcessError(p.returncode, cmd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
