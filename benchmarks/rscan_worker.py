"""One rank of the RScan communication benchmark (bench_rscan_comm.py): the examples/rscan model at 2
ranks, the same batches for every mode, timed over --steps after --warmup.

Modes: ``shardspeed-sparse`` (``sparse=True`` table, ``"sparse_gradients": true``, config Adam: lazy on the
table), ``shardspeed-dense`` (dense table and reduction, config Adam), ``ddp`` (torch DDP, ``sparse=True``
table: gloo's sparse all-reduce; SparseAdam on the table, Adam elsewhere), ``deepspeed`` (DeepSpeed 0.19.8
at ZeRO stage 0 with a ``sparse=True`` table and the same SparseAdam + Adam pair as one client optimizer;
started by torchrun from DeepSpeed's own venv, so this file imports nothing of shardspeed in that mode).

Bytes per step, per rank, counted the way shardspeed's comm log counts (all-reduce: the tensor;
all-gather: the gathered output): shardspeed from its comm log; DDP and DeepSpeed from what their
sparse paths are documented/coded to send, given each rank's coalesced row count: gloo's sparse
all-reduce all-gathers every rank's coalesced indices (int64) and rows; DeepSpeed all-gathers indices and
rows padded to the largest rank's count; both all-reduce the dense parameters' gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from examples.rscan.data import RScanData, load_pairs, split  # noqa: E402
from examples.rscan.model import RScanConfig, RScanModel  # noqa: E402

LR = 3e-3


class SplitAdam(torch.optim.Optimizer):
    """SparseAdam on the parameters whose gradients are sparse, Adam on the rest, as one optimizer (what
    DeepSpeed's ``initialize(optimizer=...)`` takes)."""

    def __init__(self, sparse_params, dense_params, lr):
        sparse_params, dense_params = list(sparse_params), list(dense_params)
        super().__init__([{"params": sparse_params}, {"params": dense_params}], {"lr": lr})
        self.lazy = torch.optim.SparseAdam(sparse_params, lr=lr)
        self.adam = torch.optim.Adam(dense_params, lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        for group, opt in zip(self.param_groups, (self.lazy, self.adam), strict=True):
            opt.param_groups[0]["lr"] = group["lr"]
            if opt is self.lazy:
                for p in group["params"]:
                    if p.grad is not None and not p.grad.is_coalesced():
                        p.grad = p.grad.coalesce()  # DeepSpeed hands back the gathered slices uncoalesced
            opt.step()


def split_adam(model: RScanModel) -> SplitAdam:
    table = [model.embedding.weight]
    return SplitAdam(table, [p for n, p in model.named_parameters() if n != "embedding.weight"], LR)


def local_nnz(q: torch.Tensor, p: torch.Tensor) -> int:
    """Rows of the table this rank's batch touches: its coalesced sparse gradient's length (padding row
    0 gets no gradient)."""
    ids = torch.cat([q.flatten(), p.flatten()])
    return int(torch.unique(ids[ids != 0]).numel())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["shardspeed-sparse", "shardspeed-dense", "ddp", "deepspeed"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=300_000)
    ap.add_argument("--queries", type=int, default=128, help="global batch (queries; two scored pairs each)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--local_rank", type=int, default=-1, help="ignored (passed by some launchers)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    train = RScanData(split(load_pairs())[0], args.vocab)
    sparse_table = args.mode != "shardspeed-dense"
    torch.manual_seed(0)
    model = RScanModel(RScanConfig(vocab=args.vocab, sparse=sparse_table))
    dense_numel = sum(p.numel() for n, p in model.named_parameters() if n != "embedding.weight")
    row_bytes = model.cfg.emb * 4

    if args.mode.startswith("shardspeed"):
        import shardspeed
        from shardspeed import comm

        cfg = {"train_batch_size": args.queries, "steps_per_print": None, "gradient_clipping": 0.0,
               "optimizer": {"type": "Adam", "params": {"lr": LR}}, "zero_optimization": {"stage": 0},
               "sparse_gradients": args.mode == "shardspeed-sparse", "comms_logger": {"enabled": True}}
        engine, *_ = shardspeed.initialize(model=model, config=cfg)
        rank, world = comm.get_rank(), comm.get_world_size()

        def step(q, p, y):
            engine.backward(engine(q, p, y))
            engine.step()

        barrier, gather = comm.barrier, comm.all_gather_object
        stats = engine.comm_stats
    else:
        import torch.distributed as dist

        if args.mode == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
            world = dist.get_world_size()
            ds_cfg = {"train_batch_size": args.queries, "train_micro_batch_size_per_gpu": args.queries // world,
                      "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=split_adam(model), config=ds_cfg)

            def step(q, p, y):
                engine.backward(engine(q, p, y))
                engine.step()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dist.init_process_group("gloo")
            ddp, opt = DDP(model), split_adam(model)

            def step(q, p, y):
                ddp(q, p, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        rank, world = dist.get_rank(), dist.get_world_size()
        barrier = dist.barrier

        def gather(obj):
            out = [None] * world
            dist.all_gather_object(out, obj)
            return out

        stats = None

    micro = args.queries // world
    times, sent = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if stats is not None:
                stats.reset()
            barrier()
            start = time.perf_counter()
        q, p, y = train.train_batch(i, args.queries)
        lo, hi = 2 * rank * micro, 2 * (rank + 1) * micro
        q, p, y = q[lo:hi], p[lo:hi], y[lo:hi]
        t0 = time.perf_counter()
        step(q, p, y)
        times.append(time.perf_counter() - t0)
    barrier()
    wall = (time.perf_counter() - start) / args.steps
    if args.mode in ("ddp", "deepspeed"):
        # The byte estimate needs every rank's touched rows. Counted after the timed loop, from the
        # global batches every rank can rebuild, so neither a collective nor the counting lands in a
        # peer's measured window (shardspeed's counts come from its comm log, which costs no traffic).
        for i in range(args.warmup, args.warmup + args.steps):
            q, p, _ = train.train_batch(i, args.queries)
            nnz = [local_nnz(q[2 * r * micro:2 * (r + 1) * micro], p[2 * r * micro:2 * (r + 1) * micro])
                   for r in range(world)]
            rows = sum(nnz) if args.mode == "ddp" else world * max(nnz)
            sent.append(rows * (8 + row_bytes) + dense_numel * 4)
    if stats is not None:
        total = sum(s.bytes for s in stats.ops.values())
        per_op = {op: s.bytes / args.steps for op, s in stats.ops.items()}
        bytes_per_step = total / args.steps
    else:
        bytes_per_step, per_op = sum(sent) / len(sent), {}
    walls = gather(wall)
    if rank == 0:
        import statistics

        row = {"mode": args.mode, "tag": args.tag, "world": world, "vocab": args.vocab, "queries": args.queries,
               "wall_step_s": max(walls), "median_step_s": statistics.median(times[args.warmup:]),
               "bytes_per_step": bytes_per_step, "bytes_by_op": per_op,
               "dense_table_bytes": args.vocab * row_bytes, "torch": torch.__version__}
        if args.mode == "deepspeed":
            import deepspeed

            row["deepspeed"] = deepspeed.__version__
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
