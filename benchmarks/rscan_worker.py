"""One rank of the RScan communication benchmark (bench_rscan_comm.py): the examples/rscan model at 2
ranks, the same batches for every mode, timed over --steps after --warmup.

Several modes (``--mode a,b,c``, run from DeepSpeed's venv when one is ``deepspeed``) share one process
group and take turns: ``--rounds`` rounds, each giving every mode ``--steps // --rounds`` steps between
two barriers, in an order rotated every round, so load from outside hits every mode alike; each mode
trains its own copy of the model on its own run of the same batches. A mode's step time is its turns'
wall time summed over its steps; its paired ratio to another is the median over rounds of the ratio of
their turns, which ran seconds apart.

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


def engine_step(engine):
    """The DeepSpeed-style step: forward, ``engine.backward``, ``engine.step``."""

    def step(q, p, y):
        loss = engine(q, p, y)
        engine.backward(loss)
        engine.step()
        return loss

    return step


class Mode:
    """One library's setup: ``step(q, p, y)`` runs one training step; ``stats``: shardspeed's comm log."""

    def __init__(self, mode: str, train: RScanData, args: argparse.Namespace):
        self.name = mode
        torch.manual_seed(0)
        model = RScanModel(RScanConfig(vocab=args.vocab, sparse=mode != "shardspeed-dense"))
        self.dense_numel = sum(p.numel() for n, p in model.named_parameters() if n != "embedding.weight")
        self.row_bytes = model.cfg.emb * 4
        self.stats = None
        if mode.startswith("shardspeed"):
            import shardspeed

            cfg = {"train_batch_size": args.queries, "steps_per_print": None, "gradient_clipping": 0.0,
                   "optimizer": {"type": "Adam", "params": {"lr": LR}}, "zero_optimization": {"stage": 0},
                   "sparse_gradients": mode == "shardspeed-sparse", "comms_logger": {"enabled": True}}
            engine, *_ = shardspeed.initialize(model=model, config=cfg)
            self.stats = engine.comm_stats
            self.step = engine_step(engine)
        elif mode == "deepspeed":
            import deepspeed
            import torch.distributed as dist

            world = dist.get_world_size()
            ds_cfg = {"train_batch_size": args.queries, "train_micro_batch_size_per_gpu": args.queries // world,
                      "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=split_adam(model), config=ds_cfg)
            self.step = engine_step(engine)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp, opt = DDP(model), split_adam(model)

            def step(q, p, y):
                loss = ddp(q, p, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            self.step = step


def init(modes: list[str]) -> tuple[int, int]:
    import torch.distributed as dist

    if "deepspeed" in modes:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif all(m.startswith("shardspeed") for m in modes):
        from shardspeed import comm

        comm.init_distributed("gloo")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, help="shardspeed-sparse, shardspeed-dense, ddp or deepspeed; several, "
                    "comma-separated: interleaved in one process group")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="turns per mode")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=300_000)
    ap.add_argument("--queries", type=int, default=128, help="global batch (queries; two scored pairs each)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--local_rank", type=int, default=-1, help="ignored (passed by some launchers)")
    args = ap.parse_args()
    launch = f"{os.getpid()}-{time.time():.0f}"  # joins the rows of one launch (the paired ratios)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import torch.distributed as dist

    names = args.mode.split(",")
    rank, world = init(names)
    train = RScanData(split(load_pairs())[0], args.vocab)
    modes = {name: Mode(name, train, args) for name in names}
    micro = args.queries // world
    per_round = max(1, args.steps // args.rounds)
    steps = per_round * args.rounds

    def batch(i: int):
        q, p, y = train.train_batch(i, args.queries)
        lo, hi = 2 * rank * micro, 2 * (rank + 1) * micro
        return q[lo:hi], p[lo:hi], y[lo:hi]

    losses: dict[str, list[float]] = {n: [] for n in names}
    for name, m in modes.items():
        for i in range(args.warmup):
            losses[name].append(float(m.step(*batch(i))))
        if m.stats is not None:
            m.stats.reset()
    turns: dict[str, list[float]] = {n: [] for n in names}
    logged: dict[str, dict[str, int]] = {n: {} for n in names}  # op -> bytes, from shardspeed's comm log
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            stats = modes[name].stats
            if stats is not None:  # the comm log is one per process: both shardspeed modes write to it
                stats.reset()
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.warmup + r * per_round, args.warmup + (r + 1) * per_round):
                losses[name].append(float(modes[name].step(*batch(i))))
            dist.barrier()
            turns[name].append((time.perf_counter() - t0) / per_round)
            if stats is not None:
                for op, s in stats.ops.items():
                    logged[name][op] = logged[name].get(op, 0) + s.bytes
    for name, m in modes.items():
        if m.stats is not None:
            per_op = {op: b / steps for op, b in logged[name].items()}
            bytes_per_step = sum(logged[name].values()) / steps
        else:
            # The byte estimate needs every rank's touched rows, counted after the timed loop from the
            # global batches every rank can rebuild, so neither a collective nor the counting lands in
            # a peer's measured window (shardspeed's counts come from its comm log, which costs no traffic).
            sent = []
            for i in range(args.warmup, args.warmup + steps):
                q, p, _ = train.train_batch(i, args.queries)
                nnz = [local_nnz(q[2 * k * micro:2 * (k + 1) * micro], p[2 * k * micro:2 * (k + 1) * micro])
                       for k in range(world)]
                rows = sum(nnz) if name == "ddp" else world * max(nnz)
                sent.append(rows * (8 + m.row_bytes) + m.dense_numel * 4)
            bytes_per_step, per_op = sum(sent) / len(sent), {}
        # the slower rank's turn is the step's time (the turns end at a barrier, so they agree closely)
        walls = [None] * world
        dist.all_gather_object(walls, turns[name])
        turn_s = [max(w[t] for w in walls) for t in range(args.rounds)]
        if rank == 0:
            row = {"mode": name, "tag": args.tag, "launch": launch, "world": world, "vocab": args.vocab,
                   "queries": args.queries,
                   "wall_step_s": sum(turn_s) / args.rounds, "turn_step_s": turn_s, "interleaved": names,
                   "bytes_per_step": bytes_per_step, "bytes_by_op": per_op, "losses": losses[name],
                   "dense_table_bytes": args.vocab * m.row_bytes, "torch": torch.__version__,
                   "load_avg": os.getloadavg()[0]}
            if name == "deepspeed":
                import deepspeed

                row["deepspeed"] = deepspeed.__version__
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print("RESULT", json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
