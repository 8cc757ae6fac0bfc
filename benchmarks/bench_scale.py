"""The largest GPT that trains 2 steps on this machine (2 ranks) with ZeRO stage 3, grown layer by
layer at hidden 2048, under a memory guard; optionally the peers the same way.

    .venv/bin/python benchmarks/bench_scale.py --layers 20,24,26,27,28 [--peers ddp,fsdp2,ds3]

Model: the GPT of examples/gpt_model.py at hidden 2048, 16 heads, vocab 8192, seq 128 (untied
head), micro-batch 1 per rank, fp32 AdamW, built under ``shardspeed.zero.Init``. A trial is killed
when MemAvailable falls below 1 GiB (before the machine swaps or the OOM killer picks a victim) or
after --timeout seconds; a mode stops growing at its first failure. Before each trial the previous
one's memory must have drained (MemAvailable >= 21 GiB). Peers run the anchors' script
(../shared/anchors/bench.py) from the DeepSpeed venv: DDP builds the full model per rank, FSDP2 on
the meta device, DeepSpeed under its zero.Init.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ANCHORS_DIR, ROOT, append_result, read_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2 ** 30
# small transients: at 1.4B parameters the model states alone take 21 of the machine's 23.5 GiB
ZERO = {"stage3_prefetch_bucket_size": 5_000_000, "stage3_max_live_parameters": 20_000_000,
        "reduce_bucket_size": 5_000_000, "stage3_max_reuse_distance": 0}
PEERS = {"ddp": ["--mode", "ddp"], "fsdp2": ["--mode", "fsdp2", "--lazy-init"],
         "ds3": ["--mode", "ds", "--zero", "3", "--lazy-init", "--ds-zero-extra", json.dumps(ZERO)]}


def guarded(cmd: list[str], timeout: float, min_avail_gib: float, log: str, cwd: str,
            disk: tuple[str, float] | None = None) -> dict:
    """Run ``cmd`` in its own session; kill the whole session when memory, time or (``disk``:
    (directory, GiB)) free space on the offload disk runs out."""
    for _ in range(120):  # let the previous trial's memory drain
        if psutil.virtual_memory().available >= 21 * GIB:
            break
        time.sleep(1)
    start, peak_used, status, min_disk = time.time(), 0, None, float("inf")
    with open(log, "w") as f:
        # MALLOC_MMAP_THRESHOLD_: large blocks go back to the system when freed (CONVENTIONS.md)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        while status is None:
            rc = proc.poll()
            vm = psutil.virtual_memory()
            peak_used = max(peak_used, vm.total - vm.available)
            if rc is not None:
                status = "ok" if rc == 0 else f"rc={rc}"
            elif vm.available < min_avail_gib * GIB:
                status = "killed (memory)"
            elif disk is not None and shutil.disk_usage(disk[0]).free < disk[1] * GIB:
                status = "killed (disk)"
            if disk is not None:
                min_disk = min(min_disk, shutil.disk_usage(disk[0]).free)
            elif time.time() - start > timeout:
                status = "killed (time)"
            if status and rc is None:
                _kill_tree(proc)
            time.sleep(0.2)
    out = {"status": status, "wall_s": round(time.time() - start, 1), "peak_sys_used_gib": round(peak_used / GIB, 2)}
    if disk is not None:
        out["min_disk_free_gib"] = round(min_disk / GIB, 2)
    return out


def _free_port() -> int:
    """A port nobody listens on now: other jobs on the machine may hold the launcher's default."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher starts each rank in a session of its own: kill the whole tree, not a group."""
    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def run_ours(layers: int, args: argparse.Namespace, log_dir: str) -> bool:
    zero = {**ZERO, "optimizer_in_backward": args.optimizer_in_backward}
    disk = None
    if args.offload:  # parameters and optimizer state on disk (issue 16), each trial in a fresh folder
        nvme = tempfile.mkdtemp(dir=args.offload)
        off = {"device": "nvme", "nvme_path": nvme}
        zero.update(offload_param={**off, "buffer_count": 4}, offload_optimizer={**off, "buffer_count": 3},
                    sub_group_size=50_000_000)
        disk = (args.offload, args.min_disk_gib)
    cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "--no_local_rank",
           "--master_port", str(_free_port()), os.path.join(HERE, "scale_worker.py"), "--layers", str(layers),
           "--zero", json.dumps(zero),
           "--tag", args.tag]
    g = guarded(cmd, args.timeout, args.min_avail_gib, os.path.join(log_dir, f"shardspeed_L{layers}.log"), ROOT, disk)
    if args.offload:
        shutil.rmtree(nvme, ignore_errors=True)  # empty: swap files are unlinked when opened
    if g["status"] != "ok":
        mode = "shardspeed-z3" + ("-oib" if args.optimizer_in_backward else "") + ("-nvme" if args.offload else "")
        append_result("scale", {"mode": mode, "layers": layers, "tag": args.tag, **g})
        return False
    rows = read_results("scale")
    rows[-1].update(g)  # the worker's row, with the guard's view of it
    _rewrite(rows)
    return True


def run_peer(mode: str, layers: int, args: argparse.Namespace, log_dir: str) -> bool:
    tmp = tempfile.mkdtemp()
    shutil.copy(os.path.join(ANCHORS_DIR, "bench.py"), tmp)
    out = os.path.join(tmp, "probe.jsonl")
    cmd = [os.path.join(args.ds_venv, "bin", "torchrun"), "--standalone", "--nproc_per_node", "2",
           os.path.join(tmp, "bench.py"), *PEERS[mode], "--layers", str(layers), "--hidden", "2048",
           "--heads", "16", "--vocab", "8192", "--seq", "128", "--global-batch", "2", "--warmup", "0",
           "--steps", "2", "--no-count", "--out", out]
    g = guarded(cmd, args.timeout, args.min_avail_gib, os.path.join(log_dir, f"{mode}_L{layers}.log"), tmp)
    row = {"mode": mode, "layers": layers, "tag": args.tag, **g}
    if os.path.exists(out):
        with open(out) as f:
            rec = json.loads(f.readline())
        row.update(step_s=rec.get("step_times"), n_params=rec.get("n_params"))
    append_result("scale", row)
    return g["status"] == "ok"


def _rewrite(rows: list[dict]) -> None:
    from common import OUT

    with open(os.path.join(OUT, "scale.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def summarize(tag: str) -> str:
    lines = ["| mode | layers | params | status | wall s | step 1 / 2 s | peak RSS/rank GiB | peak system used GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in read_results("scale"):
        if r.get("tag") != tag:
            continue
        steps = " / ".join(f"{t:.1f}" for t in r.get("step_s") or []) or "-"
        rss = " / ".join(f"{x['peak_rss'] / GIB:.2f}" for x in r.get("per_rank", [])) or "-"
        n = f"{r['n_params'] / 1e6:.0f}M" if r.get("n_params") else "-"
        lines.append(f"| {r['mode']} | {r['layers']} | {n} | {r['status']} | {r['wall_s']} | {steps} | {rss} | "
                     f"{r['peak_sys_used_gib']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="24,26,27,28")
    ap.add_argument("--peers", default="", help="comma-separated: ddp, fsdp2, ds3 (anchors' script)")
    ap.add_argument("--timeout", type=float, default=480)
    ap.add_argument("--min-avail-gib", type=float, default=1.0)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--optimizer-in-backward", action="store_true",
                    help="zero_optimization.optimizer_in_backward: no gradient shards held (12 B/param, not 16)")
    ap.add_argument("--offload", default="", help="a directory: offload_param and offload_optimizer nvme there")
    ap.add_argument("--min-disk-gib", type=float, default=8.0, help="with --offload: stop a trial below this free")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    args = ap.parse_args()
    log_dir = os.path.join(HERE, "out", "scale_logs")
    os.makedirs(log_dir, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    for L in layers:
        print(f"shardspeed stage 3, {L} layers", flush=True)
        if not run_ours(L, args, log_dir):
            break
    for mode in filter(None, args.peers.split(",")):
        for L in layers:
            print(f"{mode}, {L} layers", flush=True)
            if not run_peer(mode, L, args, log_dir):
                break
    print(summarize(args.tag))


if __name__ == "__main__":
    main()
