"""One rank of the offload speed benchmark: the same GPT trained with ZeRO stage 3 with its
optimizer state in memory and on disk (offload_optimizer nvme), modes taking turns in one launch,
step times barrier to barrier, bytes the swap file moved per step. Started by bench_offload.py.

Modes ``ds-memory``, ``ds-nvme`` and ``ds-nvme+params`` are DeepSpeed ZeRO-3 on the same model,
data and config (its own keys; the optimizer its documented default for offload: ``"type":
"AdamW"``, which DeepSpeed turns into its JIT-built DeepSpeedCPUAdam when the optimizer is
offloaded); they need the worker to run from DeepSpeed's venv (shardspeed imported from this tree),
and for nvme DeepSpeed's async_io op, JIT-built against libaio (libaio-dev installed). Disk bytes
for every mode are also read from /proc/self/io (read_bytes / write_bytes: what this process made
the block layer move, O_DIRECT included), the same counter for both libraries."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result  # noqa: E402
from mem_worker import _count  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402


def config(mode: str, nvme: str, sub_group: int) -> dict:
    zero = {"stage": 3, "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000}
    if mode in ("nvme", "nvme+params"):
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme, "buffer_count": 3}
        zero["sub_group_size"] = sub_group
    if mode == "nvme+params":
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme}
    return {"train_batch_size": 2, "steps_per_print": None, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero, "aio": {"thread_count": 2}}


def ds_config(mode: str, nvme: str, sub_group: int) -> dict:
    """DeepSpeed's ZeRO-3 with the same batch, clipping, AdamW, buckets, sub-group and aio threads as
    config(): offload_optimizer nvme (DeepSpeed's defaults otherwise: buffer_count 4, no
    pipeline_read/write), and offload_param nvme for ds-nvme+params (its max_in_cpu default, 1e9
    elements, keeps a model this size in host memory: set it to 0 to put the parameters on disk)."""
    zero = {"stage": 3, "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
            "sub_group_size": sub_group}
    if mode in ("ds-nvme", "ds-nvme+params"):
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme}
    if mode == "ds-nvme+params":
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme}
    return {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
            "gradient_clipping": 1.0, "wall_clock_breakdown": False,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero, "aio": {"intra_op_parallelism": 2}}


def proc_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process (all its threads) made the block layer move."""
    with open("/proc/self/io") as f:
        kv = dict(line.split(": ") for line in f.read().splitlines())
    return int(kv["read_bytes"]), int(kv["write_bytes"])


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run_ds(mode: str, args: argparse.Namespace, cfg: GPTConfig) -> dict:
    import gc

    import deepspeed
    import torch.distributed as dist

    torch.manual_seed(1234)
    model = GPT(cfg)
    t0 = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(mode, args.nvme, args.sub_group))
    init_s = time.perf_counter() - t0
    rank = dist.get_rank()
    times, io, losses = [], [], []
    for step in range(args.warmup + args.steps):
        x, y = synthetic_batch(step, 2, cfg.seq, cfg.vocab)
        dist.barrier()
        before = proc_io()
        t = time.perf_counter()
        loss = engine(x[rank:rank + 1], y[rank:rank + 1])
        engine.backward(loss)
        engine.step()
        dist.barrier()
        after = proc_io()
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
            io.append((after[0] - before[0], after[1] - before[1]))
    row = {"mode": mode, "step_s": times, "swap_io_bytes": [], "proc_io_bytes": io, "losses": losses,
           "init_s": init_s, "rss_gib": rss_gib(), "optimizer": type(engine.optimizer.optimizer).__name__
           if hasattr(engine.optimizer, "optimizer") else type(engine.optimizer).__name__,
           "deepspeed": deepspeed.__version__}
    engine.destroy()
    del engine, model
    gc.collect()
    return row


def run(mode: str, args: argparse.Namespace, cfg: GPTConfig) -> dict:
    if mode.startswith("ds-"):
        return run_ds(mode, args, cfg)
    import shardspeed
    from shardspeed import comm

    torch.manual_seed(1234)
    engine, *_ = shardspeed.initialize(model=GPT(cfg), config=config(mode, args.nvme, args.sub_group))
    rank = comm.get_rank()
    swap = engine.optimizer_swapper
    tier = engine.strategy.param_tier
    files = [f for f in (getattr(swap, "file", None), getattr(tier, "file", None)) if f is not None]
    times, io, pio, losses = [], [], [], []
    for step in range(args.warmup + args.steps):
        x, y = synthetic_batch(step, 2, cfg.seq, cfg.vocab)
        before = (sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))
        comm.barrier()
        pbefore = proc_io()
        t = time.perf_counter()
        loss = engine(x[rank:rank + 1], y[rank:rank + 1])
        engine.backward(loss)
        engine.step()
        comm.barrier()
        pafter = proc_io()
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
            pio.append((pafter[0] - pbefore[0], pafter[1] - pbefore[1]))
            if files:
                after = (sum(f.bytes_read for f in files), sum(f.bytes_written for f in files))
                io.append((after[0] - before[0], after[1] - before[1]))
    mem = engine.memory_breakdown()
    if swap:
        swap.close()
    if tier is not None:
        tier.close()
    return {"mode": mode, "step_s": times, "swap_io_bytes": io, "proc_io_bytes": pio, "losses": losses,
            "rss_gib": rss_gib(), "memory": mem, "direct_io": bool(swap and swap.file.direct)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default="memory,nvme")
    ap.add_argument("--nvme", required=True)
    ap.add_argument("--sub-group", type=int, default=50_000_000)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--rep", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import shardspeed
    from shardspeed import comm

    if any(m.startswith("ds-") for m in args.modes.split(",")):
        import deepspeed  # DeepSpeed's venv: its own init, which shardspeed's then joins

        deepspeed.init_distributed(dist_backend="gloo")
    shardspeed.init_distributed()
    cfg = GPTConfig(vocab=8192, seq=128, layers=args.layers, hidden=args.hidden, heads=16)
    n = _count(cfg)
    for mode in args.modes.split(","):  # each mode's row written as it ends: a later failure keeps it
        row = run(mode, args, cfg)
        gathered = comm.all_gather_object(row)
        if comm.get_rank() == 0:
            row["swap_io_bytes_per_rank"] = [g["swap_io_bytes"] for g in gathered]
            row["proc_io_bytes_per_rank"] = [g["proc_io_bytes"] for g in gathered]
            row["rss_gib_per_rank"] = [g["rss_gib"] for g in gathered]
            append_result("offload", {**row, "layers": args.layers, "hidden": args.hidden, "n_params": n,
                                      "tag": args.tag, "rep": args.rep,
                                      "load_avg": os.getloadavg(), "cpu": torch.backends.cpu.get_cpu_capability()})
            print(json.dumps({k: row[k] for k in ("mode", "step_s")}), flush=True)

if __name__ == "__main__":
    main()
