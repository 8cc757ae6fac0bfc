"""Offload to disk (issue 16): the disk's sequential bandwidth, and step time with the optimizer
state on disk against in memory.

    .venv/bin/python benchmarks/bench_offload.py bandwidth --dir /path/on/disk --gib 2
    .venv/bin/python benchmarks/bench_offload.py speed --dir /path/on/disk --layers 9 --reps 2

bandwidth: writes then reads ``--gib`` GiB sequentially through shardspeed's swap file
(zero/swap_io.py: O_DIRECT where the filesystem takes it, requests of aio.block_size x queue_depth
on aio.thread_count threads) for 1, 2 and 4 threads, and with ``dd`` (oflag/iflag=direct, 8 MiB
blocks) for reference. speed: 2 local ranks, the GPT of examples/gpt_model.py (hidden 2048, 16
heads, vocab 8192, seq 128, micro-batch 1 per rank, fp32 AdamW, clipping 1.0), ZeRO stage 3; modes
take turns in one launch, repetitions reverse their order. The scale trials (the largest model with
parameters and optimizer state on disk) are ``bench_scale.py --offload DIR``.

DeepSpeed's NVMe offload needs its async_io op, JIT-built against libaio's headers; on this
machine ``AsyncIOBuilder().is_compatible()`` is False (libaio-dev is not installed), so DeepSpeed
ZeRO-3 with offload_optimizer nvme does not run here and is not in the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
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


def speed(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        with tempfile.TemporaryDirectory(dir=args.dir) as nvme:
            launch(2, os.path.join(HERE, "offload_worker.py"), "--layers", str(args.layers), "--hidden",
                   str(args.hidden), "--steps", str(args.steps), "--modes", ",".join(order), "--nvme", nvme,
                   "--sub-group", str(args.sub_group), "--tag", args.tag,
                   env={"MALLOC_MMAP_THRESHOLD_": "65536"}, results="offload")
    print(summarize(args.tag))


def summarize(tag: str) -> str:
    rows = [r for r in read_results("offload") if r.get("tag") == tag]
    by_mode: dict[str, list[float]] = {}
    io: dict[str, list[float]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).extend(r["step_s"])
        for per_rank in r.get("swap_io_bytes_per_rank", []):
            io.setdefault(r["mode"], []).extend(sum(x) for x in per_rank)
    base = median(by_mode["memory"]) if "memory" in by_mode else None
    lines = ["| mode | params | median step s | / in memory | swap bytes read+written per rank per step |",
             "|---|---|---|---|---|"]
    n = rows[0]["n_params"] if rows else 0
    for mode, ts in by_mode.items():
        ratio = f"{median(ts) / base:.2f}" if base else "-"
        moved = f"{median(io[mode]) / 1e9:.2f} GB" if io.get(mode) else "-"
        lines.append(f"| {mode} | {n / 1e6:.0f}M | {median(ts):.2f} | {ratio} | {moved} |")
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
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    os.chdir(ROOT)
    (bandwidth if args.what == "bandwidth" else speed)(args)


if __name__ == "__main__":
    main()
