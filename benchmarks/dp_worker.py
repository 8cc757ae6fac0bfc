"""One rank of the stage-0 benchmark: shardspeed vs torch DDP on the anchors' GPT, same data.

Started by bench_stage0.py through the launcher (2 ranks, 1 thread each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result, batch, build_model, median  # noqa: E402


def run_ddp(args, model, world, rank):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    ddp = DDP(model)
    # the same fused AdamW kernel shardspeed runs, so step times compare the engines, not kernels
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    micro = args.global_batch // world

    def step(i):
        x, y = batch(i, args.global_batch)
        x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = ddp(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync_max(t):
        v = torch.tensor([t])
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.item()

    def mean_loss(loss):
        v = loss.detach().float().reshape(1)
        dist.all_reduce(v)
        return v.item() / world

    return step, sync_max, mean_loss, dist.barrier


def run_shardspeed(args, model, world, rank):
    import shardspeed
    from shardspeed import comm

    cfg = {"train_batch_size": args.global_batch, "steps_per_print": None,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "bf16": {"enabled": args.dtype == "bf16"},
           "zero_optimization": {"stage": args.stage, "overlap_comm": True}}
    engine, *_ = shardspeed.initialize(model=model, config=cfg)
    micro = engine.train_micro_batch_size_per_gpu()

    def step(i):
        x, y = batch(i, args.global_batch)
        loss = engine(x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro])
        engine.backward(loss)
        engine.step()
        return loss

    def sync_max(t):
        v = torch.tensor([t])
        comm.all_reduce(v, op="max")
        return v.item()

    def mean_loss(loss):
        v = loss.detach().float().reshape(1)
        comm.all_reduce(v)
        return v.item() / world

    return step, sync_max, mean_loss, comm.barrier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "shardspeed"], required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    model = build_model()
    runner = run_ddp if args.mode == "ddp" else run_shardspeed
    step, sync_max, mean_loss, barrier = runner(args, model, world, rank)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        barrier()
        start = time.perf_counter()
        loss = step(i)
        t = sync_max(time.perf_counter() - start)
        losses.append(mean_loss(loss))
        if i >= args.warmup:
            times.append(t)
    if rank == 0:
        append_result("stage0", {"mode": args.mode, "dtype": args.dtype, "stage": args.stage, "tag": args.tag,
                                 "median_step_s": median(times), "times": times, "losses": losses})


if __name__ == "__main__":
    main()
