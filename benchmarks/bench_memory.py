"""Model-state memory per rank: shardspeed ZeRO 0/1/2 against theory, DDP, FSDP2 and DeepSpeed.

    .venv/bin/python benchmarks/bench_memory.py [--ds-venv ../.venv-deepspeed]

2 ranks, fp32, AdamW, a ~46M-parameter GPT (12 layers, hidden 512, vocab 8192, seq 128). Ours:
``engine.memory_breakdown()`` (parameters + gradients + fp32 masters + optimizer state), counted
tensor bytes. Peers: the anchors' own census script (``../shared/anchors/bench.py``, copied to a
temporary folder) run with torchrun from the DeepSpeed venv, on the same dimensions (its model has
a qkv bias: compare bytes per parameter). MALLOC_MMAP_THRESHOLD_=65536 for every run so that peak
RSS tracks live tensors (CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, launch, read_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.path.join(ROOT, "..", "shared", "anchors")
THEORY = {0: lambda n: 16.0, 1: lambda n: 4 + 4 + 8 / n, 2: lambda n: 4 + 12 / n, 3: lambda n: 16 / n}
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_ours(stages: list[int], tag: str) -> None:
    for s in stages:
        print(f"shardspeed stage {s}", flush=True)
        launch(2, os.path.join(HERE, "mem_worker.py"), "--stage", str(s), "--tag", tag, env=ENV)
    if 3 in stages:
        print("shardspeed stage 3 under zero.Init", flush=True)
        launch(2, os.path.join(HERE, "mem_worker.py"), "--stage", "3", "--zero-init", "--tag", tag, env=ENV)


def run_peers(ds_venv: str, tag: str) -> list[dict]:
    torchrun = os.path.join(ds_venv, "bin", "torchrun")
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(ANCHORS, "bench.py"), tmp)
    out = os.path.join(tmp, "peers.jsonl")
    modes = [["--mode", "ddp"], ["--mode", "fsdp2"], ["--mode", "ds", "--zero", "1"], ["--mode", "ds", "--zero", "2"],
             ["--mode", "ds", "--zero", "3", "--lazy-init"]]
    for m in modes:
        print("peer", " ".join(m), flush=True)
        subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(tmp, "bench.py"), *m,
                        "--layers", "12", "--warmup", "0", "--steps", "3", "--ds-clip", "0", "--out", out,
                        "--tag", tag], check=True, env={**os.environ, "OMP_NUM_THREADS": "1", **ENV}, cwd=tmp)
    with open(out) as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    run_ours([int(x) for x in args.stages.split(",")], args.tag)
    has_ds = os.path.exists(os.path.join(args.ds_venv, "bin", "torchrun"))
    peers = run_peers(args.ds_venv, args.tag) if has_ds and not args.no_peers else []
    print("| run | params | B/param/rank: params | grads | fp32 master | optim | total | theory | "
          "counted peak (stage 3) | peak RSS GiB | peak RSS over start, B/param |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in read_results("memory"):
        if r["tag"] != args.tag:
            continue
        m, n = r["per_rank"][0], r["n_params"]
        total = m["parameters"] + m["gradients"] + m["master_parameters"] + m["optimizer_states"]
        peak = max(x["peak_rss"] for x in r["per_rank"]) / 2**30
        grow = max(x["peak_rss"] - x["rss_start"] for x in r["per_rank"]) / n
        name = f"shardspeed stage {r['stage']}" + (" (zero.Init)" if r.get("zero_init") else "")
        print(f"| {name} | {n / 1e6:.1f}M | {m['parameters'] / n:.2f} | "
              f"{m['gradients'] / n:.2f} | {m['master_parameters'] / n:.2f} | {m['optimizer_states'] / n:.2f} | "
              f"{total / n:.2f} | "
              f"{THEORY[r['stage']](2):.2f} | {_counted_peak(m, total, n)} | {peak:.2f} | {grow:.1f} |")
    for r in peers:
        c, n = r["per_rank"][0]["counts"], r["n_params"]
        parts = [c.get(k, 0) / n for k in ("params", "grads", "fp32_master", "optim_state")]
        name = f"DeepSpeed ZeRO-{r['zero']}" if r["mode"] == "ds" else {"ddp": "torch DDP", "fsdp2": "torch FSDP2"}[
            r["mode"]]
        peak = max(x["peak_rss"] for x in r["per_rank"]) / 2**30
        grow = max(x["peak_rss"] - x["rss_after_import"] for x in r["per_rank"]) / n
        print(f"| {name} | {n / 1e6:.1f}M | " + " | ".join(f"{p:.2f}" for p in parts) +
              f" | {sum(parts):.2f} | | | {peak:.2f} | {grow:.1f} |")


def _counted_peak(m: dict, total: int, n: int) -> str:
    """Stage 3: model states at rest plus the largest transient it held (gathered parameters, full
    gradient buffers), per parameter; the issue's bound is 16/N + 25% = 10 at N = 2."""
    if "peak_transient" not in m:
        return ""
    return f"{(total + m['peak_transient']) / n:.2f}"


if __name__ == "__main__":
    main()
