"""One rank of the stage-0 benchmark: shardspeed vs torch DDP on the anchors' GPT, same data.

Started by bench_stage0.py through the launcher (2 ranks, 1 thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import anchors_batch, append_result, batch, build_anchors_model, build_model, median  # noqa: E402


def _torch_loop(args, train_model, opt, world, rank, autocast):
    """Step, timing and loss functions of a plain torch.distributed training loop (DDP, FSDP2)."""
    import torch.distributed as dist

    micro = args.global_batch // world

    def step(i):
        x, y = args.batch(i, args.global_batch)
        x, y = x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = train_model(x, y)
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

    return step, sync_max, mean_loss, dist.barrier, lambda: None


def run_ddp(args, model, world, rank):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    ddp = DDP(model)
    # by default the same fused AdamW kernel shardspeed runs, so step times compare engines, not kernels
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01, fused=args.adam == "fused")
    return _torch_loop(args, ddp, opt, world, rank, autocast=args.dtype == "bf16")


def run_fsdp2(args, model, world, rank):
    """FSDP2 as the anchors run it: one unit per block plus the root; bf16 = bf16 parameters for
    compute with fp32 gradient reduction and fp32 sharded masters (MixedPrecisionPolicy)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    kw = {"mesh": init_device_mesh("cpu", (world,))}
    if args.dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in model.blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=args.adam == "fused")
    return _torch_loop(args, model, opt, world, rank, autocast=False)


def run_shardspeed(args, model, world, rank):
    import shardspeed
    from shardspeed import comm

    cfg = {"train_batch_size": args.global_batch, "steps_per_print": None,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "bf16": {"enabled": args.dtype == "bf16"},
           "zero_optimization": {"stage": args.stage, "overlap_comm": True, **json.loads(args.zero)}}
    client = None
    if args.adam == "foreach":  # what the anchors gave DeepSpeed and FSDP2: torch's foreach AdamW
        del cfg["optimizer"]
        cfg["zero_allow_untested_optimizer"] = True
        client = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    engine, *_ = shardspeed.initialize(model=model, optimizer=client, config=cfg)
    micro = engine.train_micro_batch_size_per_gpu()

    def step(i):
        x, y = args.batch(i, args.global_batch)
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

    # the work a step leaves in flight (stages 1-2 parameter all-gathers with overlap_comm), finished
    # inside a timing window so that no step is timed without it
    finish = getattr(engine.strategy, "wait_params", lambda: None)
    return step, sync_max, mean_loss, comm.barrier, finish


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "fsdp2", "shardspeed"], required=True)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--adam", choices=["fused", "foreach"], default=None,
                    help="AdamW kernel (default: fused, FSDP2's default foreach); shardspeed with foreach "
                         "takes torch.optim.AdamW as a client optimizer instead of the config's")
    ap.add_argument("--model", choices=["ours", "anchors"], default="ours",
                    help="anchors: the exact model and data of ../shared/anchors/bench.py")
    ap.add_argument("--tag", default="")
    ap.add_argument("--zero", default="{}", help="JSON merged into shardspeed's zero_optimization")
    args = ap.parse_args()
    if args.adam is None:
        args.adam = "foreach" if args.mode == "fsdp2" else "fused"
    torch.set_num_threads(1)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    model = build_anchors_model() if args.model == "anchors" else build_model()
    args.batch = anchors_batch if args.model == "anchors" else batch
    runner = {"ddp": run_ddp, "fsdp2": run_fsdp2, "shardspeed": run_shardspeed}[args.mode]
    step, sync_max, mean_loss, barrier, finish = runner(args, model, world, rank)
    # [Note: what a step time holds] (1) barrier to barrier: each step from a barrier to its return
    # plus whatever it left in flight (finish()); (2) the loop's wall time over the same number of
    # steps, no barrier between them, everything finished before the clock stops: what a training run
    # sees, overlap across steps included. The peers have nothing in flight after step().
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        barrier()
        start = time.perf_counter()
        loss = step(i)
        finish()
        t = sync_max(time.perf_counter() - start)
        losses.append(mean_loss(loss))
        if i >= args.warmup:
            times.append(t)
    barrier()
    start = time.perf_counter()
    for i in range(args.warmup + args.steps, args.warmup + 2 * args.steps):
        step(i)
    finish()
    barrier()
    wall = sync_max(time.perf_counter() - start) / args.steps
    if rank == 0:
        append_result("stage0", {"mode": args.mode, "dtype": args.dtype, "stage": args.stage, "tag": args.tag,
                                 "model": args.model, "adam": args.adam, "median_step_s": median(times),
                                 "wall_step_s": wall, "times": times, "losses": losses})


if __name__ == "__main__":
    main()
