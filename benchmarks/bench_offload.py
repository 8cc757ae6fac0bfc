"""Offload to disk (issue 16): the disk's sequential bandwidth, and step time with the optimizer
state on disk against in memory.

    .venv/bin/python benchmarks/bench_offload.py bandwidth --dir /path/on/disk --gib 2
    .venv/bin/python benchmarks/bench_offload.py speed --dir /path/on/disk --layers 9 --reps 2 \
        [--modes memory,nvme,ds-nvme,ds-memory] [--ds-venv ../.venv-deepspeed]

bandwidth: writes then reads ``--gib`` GiB sequentially through shardspeed's swap file
(zero/swap_io.py: O_DIRECT where the filesystem takes it, requests of aio.block_size x queue_depth
on aio.thread_count threads) for 1, 2 and 4 threads, and with ``dd`` (oflag/iflag=direct, 8 MiB
blocks) for reference. speed: 2 local ranks, the GPT of examples/gpt_model.py (hidden 2048, 16
heads, vocab 8192, seq 128, micro-batch 1 per rank, fp32 AdamW, clipping 1.0), ZeRO stage 3; modes
take turns in one launch, repetitions reverse their order. The scale trials (the largest model with
parameters and optimizer state on disk) are ``bench_scale.py --offload DIR``.

DeepSpeed modes (``ds-memory``, ``ds-nvme``: offload_optimizer nvme, ``ds-nvme+params``: and
offload_param nvme): DeepSpeed ZeRO-3 on the same model, data, ranks and config, its optimizer the
documented default for offload (``"type": "AdamW"`` -> DeepSpeedCPUAdam, JIT-built). With any ds-
mode the worker launches from DeepSpeed's venv (``--ds-venv``; same torch wheel, shardspeed
imported from this tree, ``deepspeed.init_distributed(dist_backend="gloo")`` on its CPU
accelerator), so all modes still take turns in one launch. **DeepSpeed's NVMe offload needs its
async_io op, JIT-built against libaio's headers: install libaio-dev first** (``apt-get install
libaio-dev``; ``AsyncIOBuilder().is_compatible()`` must be True in DeepSpeed's venv), else the
ds-nvme modes fail at ``deepspeed.initialize``. shardspeed needs no compiled op. Disk bytes: the
swap files' counters for shardspeed, and /proc/self/io (read_bytes, write_bytes) per rank for both
libraries; every swap file lives under a temporary directory in ``--dir``, removed after each launch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, append_result, launch, median, read_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bandwidth(args: argparse.Namespace) -> None:
    import torch

    from shardspeed.config.schema import AioConfig
    from shardspeed.zero.swap_io import SwapFile, aligned_empty

    nbytes = int(args.gib * 2**30)
    chunk = 256 * 2**20  # one transfer: a large sub-group's region
    buf = aligned_empty(chunk)
    buf.view(torch.float32).normal_()
    rows = []
    for threads in (1, 2, 4):
        f = SwapFile(args.dir, "bandwidth", 0, AioConfig(thread_count=threads))
        offsets = [f.allocate(chunk) for _ in range(nbytes // chunk)]
        t = time.perf_counter()
        handles = [f.write(o, buf, chunk) for o in offsets]
        for h in handles:
            h.wait()
        os.fsync(f.fd)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        for o in offsets:  # one buffer: reads in turn, each split over the threads
            f.read(o, buf, chunk).wait()
        read_s = time.perf_counter() - t
        rows.append({"tool": "shardspeed swap file", "threads": threads, "direct": f.direct,
                     "write_GBps": nbytes / write_s / 1e9, "read_GBps": nbytes / read_s / 1e9})
        f.close()
    path = os.path.join(args.dir, "dd-probe")
    count = nbytes // (8 * 2**20)
    for kind, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "oflag=direct"]),
                      ("read", ["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"])):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        gbps = nbytes / (time.perf_counter() - t) / 1e9
        rows.append({"tool": "dd", "threads": 1, "direct": True, f"{kind}_GBps": gbps})
    os.unlink(path)
    for r in rows:
        append_result("offload_bandwidth", {**r, "gib": args.gib, "tag": args.tag})
        print(json.dumps(r))


def launch_ds(ds_venv: str, script: str, *args: str, env: dict) -> None:
    """launch() from DeepSpeed's venv, shardspeed imported from this tree (bench_pipe.py's way)."""
    import socket

    python = os.path.join(ds_venv, "bin", "python")
    if not os.path.exists(python):
        raise SystemExit(f"ds- modes need DeepSpeed's venv: no python at {python} (--ds-venv)")
    before = len(read_results("offload"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [python, "-m", "shardspeed.launcher", "--num_procs", "2", "--no_local_rank", "--master_port", str(port),
           script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **env})
    if p.returncode != 0 and not len(read_results("offload")) > before:  # gloo's abort at exit: rows decide
        raise subprocess.CalledProcessError(p.returncode, cmd)


def speed(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    total, _, free = shutil.disk_usage(args.dir)
    print(f"disk free under {args.dir}: {free / 2**30:.1f} GiB", flush=True)
    if free < args.min_disk_gib * 2**30:
        raise SystemExit(f"--dir {args.dir}: {free / 2**30:.1f} GiB free < --min-disk-gib {args.min_disk_gib}")
    # With DeepSpeed in the comparison each mode gets its own launch (still alternating, in one
    # command): a destroyed DeepSpeed ZeRO-3 engine left ~6 GiB per rank of a 0.49B model's memory
    # behind in the process, which the next mode would have had to share the machine with.
    with_ds = any(m.startswith("ds-") for m in modes)
    for rep in range(args.first_rep, args.first_rep + args.reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for group in ([[m] for m in order] if with_ds else [order]):
            with tempfile.TemporaryDirectory(dir=args.dir) as nvme:
                wargs = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--steps", str(args.steps),
                         "--warmup", str(args.warmup), "--modes", ",".join(group), "--nvme", nvme,
                         "--sub-group", str(args.sub_group), "--tag", args.tag, "--rep", str(rep)]
                env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
                if with_ds:
                    launch_ds(args.ds_venv, os.path.join(HERE, "offload_worker.py"), *wargs, env=env)
                else:
                    launch(2, os.path.join(HERE, "offload_worker.py"), *wargs, env=env, results="offload")
    print(summarize(args.tag))


NAMES = {"memory": "shardspeed, in memory", "nvme": "shardspeed, offload_optimizer nvme",
         "nvme+params": "shardspeed, + offload_param nvme", "ds-memory": "DeepSpeed ZeRO-3, in memory",
         "ds-nvme": "DeepSpeed ZeRO-3, offload_optimizer nvme",
         "ds-nvme+params": "DeepSpeed ZeRO-3, + offload_param nvme"}


def summarize(tag: str) -> str:
    rows = [r for r in read_results("offload") if r.get("tag") == tag]
    by_mode: dict[str, list[float]] = {}
    io: dict[str, list[tuple[float, float]]] = {}
    pio: dict[str, list[tuple[float, float]]] = {}
    rss: dict[str, list[float]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).extend(r["step_s"])
        for per_rank in r.get("swap_io_bytes_per_rank", []):
            io.setdefault(r["mode"], []).extend(per_rank)
        for per_rank in r.get("proc_io_bytes_per_rank", []):
            pio.setdefault(r["mode"], []).extend(per_rank)
        rss.setdefault(r["mode"], []).extend(r.get("rss_gib_per_rank", []))
    base = median(by_mode["memory"]) if "memory" in by_mode else None

    def gb(xs):
        return f"{median([x[0] for x in xs]) / 1e9:.2f} + {median([x[1] for x in xs]) / 1e9:.2f} GB" if xs else "-"

    # the machine's load swings within minutes: the ratio that counts is the one within a repetition
    # (the modes ran minutes apart), per rep, then its median
    per_rep: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        per_rep.setdefault((r["mode"], r.get("rep", 0)), []).extend(r["step_s"])
    lines = ["| mode | params | step s (each; per rep) | median step s | / shardspeed in memory, per rep | "
             "median of those | swap-file bytes read + written per rank per step | /proc/self/io read + write "
             "per rank per step | RSS/rank at end GiB |", "|---|---|---|---|---|---|---|---|---|"]
    n = rows[0]["n_params"] if rows else 0
    reps = sorted({r.get("rep", 0) for r in rows})
    for mode, ts in by_mode.items():
        each = "; ".join(" / ".join(f"{t:.1f}" for t in per_rep[(mode, k)]) for k in reps if (mode, k) in per_rep)
        ratios = [median(per_rep[(mode, k)]) / median(per_rep[("memory", k)]) for k in reps
                  if (mode, k) in per_rep and ("memory", k) in per_rep]
        paired = " / ".join(f"{x:.2f}" for x in ratios) or "-"
        mid = f"{median(ratios):.2f}" if ratios else (f"{median(ts) / base:.2f}" if base else "-")
        mem = f"{max(rss[mode]):.2f}" if rss.get(mode) else "-"
        lines.append(f"| {NAMES.get(mode, mode)} | {n / 1e6:.0f}M | {each} | {median(ts):.2f} | {paired} | {mid} | "
                     f"{gb(io.get(mode))} | {gb(pio.get(mode))} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["bandwidth", "speed"])
    ap.add_argument("--dir", required=True, help="a directory on the disk under test")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", default="memory,nvme")
    ap.add_argument("--sub-group", type=int, default=50_000_000)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-disk-gib", type=float, default=8.0, help="refuse to start below this much free disk")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"),
                    help="DeepSpeed's venv, for the ds- modes")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--first-rep", type=int, default=0, help="start at this repetition (its order)")
    args = ap.parse_args()
    os.chdir(ROOT)
    (bandwidth if args.what == "bandwidth" else speed)(args)


if __name__ == "__main__":
    main()
