"""One rank of the tensor-parallel benchmark (bench_tp.py): the same tied GPT, the same global batch and
AdamW, on 4 ranks, trained by

- ``shardspeed``: examples/megatron_gpt's ParallelGPT, T=2 x ZeRO stage 1 or 3 over D=2;
- ``torch-tp``: PyTorch's tensor parallelism, T=2 (``parallelize_module`` with Colwise/Rowwise on the
  "tp" dimension of a 2-D DeviceMesh, vocabulary-parallel loss with ``loss_parallel``) x FSDP2 over
  the "dp" dimension: PyTorch's own 2-D recipe;
- ``fsdp2``: FSDP2 over all 4 ranks (D=4) on the plain GPT, one unit per block plus the root.

Started by bench_tp.py through the launcher, 1 thread per rank. Each run times its steps (Note: what
a step time holds, in dp_worker.py), then counts the bytes its collectives carry over a few more
steps (``CollectiveCounter``), and appends one row to benchmarks/out/tp.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_result, median  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402

SEED = 1234


# -- counting the bytes of every collective ------------------------------------------------------------
# [Note: bytes communicated, counted one way for everyone]
# A TorchDispatchMode sees every op that reaches the dispatcher from this thread: torch.distributed's
# eager collectives (c10d::allreduce_, _allgather_base_, broadcast_, ...: FSDP2's and shardspeed's)
# and the functional ones DTensor issues (_c10d_functional::all_reduce, ...). One catch: a collective
# that DTensor issues *inside* its own handling of an aten op (loss_parallel's all-reduces, a
# redistribution in sharding propagation) runs while the mode is switched off, so the mode declines
# every op on a DTensor (NotImplemented): DTensor then handles it with the mode still on, and the
# collectives it issues on plain local tensors are seen. (Checked: without the decline, loss_parallel's
# three forward all-reduces are missing; with it, every collective is counted once, and shardspeed's
# own comm log agrees byte for byte.)
#
# Per collective we count its payload S: the all-reduce or broadcast buffer, the all-gather's output,
# the reduce-scatter's input (what the comm log of shardspeed calls nbytes), and the bytes a rank sends
# on a ring of n ranks: 2(n-1)/n S for an all-reduce, (n-1)/n S for the rest (a broadcast's root sends
# S, the others nothing: (n-1)/n S per rank on average; shardspeed's all-gather on gloo is n broadcasts
# of S/n, i.e. (n-1)/n S, like a ring all-gather; its reduce-scatter of a scratch buffer on gloo is an
# all-reduce and is counted as one).

_SKIP = {"wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier_", "barrier_"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _group_ranks(func_name: str, args, kwargs) -> list[int]:
    """The global ranks of the collective's process group (a ScriptObject for c10d ops, a group name
    for the functional ones)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in list(args) + list((kwargs or {}).values()):
        pg = None
        if isinstance(a, torch.ScriptObject):
            try:
                pg = dist.ProcessGroup.unbox(a)
            except Exception:  # a ReduceOp, not a group
                continue
        elif isinstance(a, str) and func_name.startswith("_c10d_functional"):
            try:
                pg = _resolve_process_group(a)
            except Exception:
                continue
        if pg is not None:
            return dist.get_process_group_ranks(pg)
    return list(range(dist.get_world_size()))


class CollectiveCounter(TorchDispatchMode):
    """Sums calls, payload bytes and ring bytes per collective kind and process group (its global
    ranks) while active (Note: bytes communicated)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0, "ring_bytes": 0.0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run with this mode on: its inner collectives are seen
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and name not in _SKIP:
            ranks = _group_ranks(f"{ns}::{name}", args, kwargs)
            n = len(ranks)
            if ns == "_c10d_functional":  # (input, ..., group_size, group_name)
                payload = _nbytes(args[0]) * (n if name.startswith("all_gather") else 1)
            elif name in ("_allgather_base_", "allgather_", "allgather_into_tensor_coalesced_",
                          "allgather_coalesced_"):
                payload = _nbytes(args[0])  # the output(s)
            elif name.startswith("_reduce_scatter_base") or name.startswith("reduce_scatter"):
                payload = _nbytes(args[1])  # the input(s)
            else:  # allreduce_, broadcast_, ...: the buffer(s)
                payload = _nbytes(args[0])
            kind = ("all_reduce" if "allreduce" in name or name.startswith("all_reduce")
                    else "all_gather" if "all_gather" in name or "allgather" in name
                    else "reduce_scatter" if "reduce_scatter" in name
                    else "broadcast" if "broadcast" in name else name)
            factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
            rec = self.ops[f"{kind} ranks {','.join(map(str, ranks))}"]
            rec["calls"] += 1
            rec["bytes"] += payload
            rec["ring_bytes"] += factor * payload
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> dict:
        ops = {k: {f: v / steps for f, v in rec.items()} for k, rec in sorted(self.ops.items())}
        return {"ops": ops, "bytes": sum(r["bytes"] for r in ops.values()),
                "ring_bytes": sum(r["ring_bytes"] for r in ops.values()),
                "calls": sum(r["calls"] for r in ops.values())}


# -- the models -------------------------------------------------------------------------------------------
def plain_gpt(cfg: GPTConfig) -> GPT:
    """The unsliced tied GPT holding the initial values of examples/megatron_gpt's ParallelGPT drawn from
    SEED: every run starts from these. Built before any model-parallel unit exists (T = 1). (Drawn
    from the same seed, ``GPT(cfg)`` itself differs from ParallelGPT from the position embedding on:
    ParallelGPT's ``nn.Embedding`` draws twice.)"""
    from examples.megatron_gpt.model import ParallelGPT, load_plain

    torch.manual_seed(SEED)
    return load_plain(ParallelGPT(cfg).state_dict(), cfg)


class TPBlock(nn.Module):
    """examples.gpt_model.Block with q, k and v as three projections: ColwiseParallel cuts a weight
    into T contiguous row blocks, and a contiguous 1/T of the fused [q; k; v] rows is not whole heads
    of each (at T=2, rank 0 would hold all of q and half of k). Same arithmetic as the fused one."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads  # this rank's heads once parallelized
        self.ln1 = nn.LayerNorm(c.hidden)
        self.q = nn.Linear(c.hidden, c.hidden, bias=False)
        self.k = nn.Linear(c.hidden, c.hidden, bias=False)
        self.v = nn.Linear(c.hidden, c.hidden, bias=False)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc = nn.Linear(c.hidden, 4 * c.hidden)
        self.out = nn.Linear(4 * c.hidden, c.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TPGPT(nn.Module):
    """The plain tied GPT with TPBlocks, holding a plain GPT's values: the same function."""

    def __init__(self, c: GPTConfig, plain: GPT):
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.hidden)
        self.pos = nn.Embedding(c.seq, c.hidden)
        self.blocks = nn.ModuleList(TPBlock(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)
        state = {}
        for k, v in plain.state_dict().items():
            if k.endswith(".qkv.weight"):
                pre = k[: -len("qkv.weight")]
                for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                    state[f"{pre}{name}.weight"] = part
            else:
                state[k] = v
        self.load_state_dict(state)
        self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))  # a DTensor sharded on the vocabulary (loss_parallel)
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))


# -- the runs: each returns (step, finish, dp_rank, dp_size, info) ---------------------------------------
def run_shardspeed(args, cfg, plain):
    import shardspeed
    from examples.megatron_gpt.model import ParallelGPT

    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=args.tp)
    torch.manual_seed(SEED)  # the same full weights as plain_gpt, each rank keeping its slice
    model = ParallelGPT(cfg)
    conf = {"train_batch_size": args.global_batch, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "zero_optimization": {"stage": args.stage, "overlap_comm": True}}
    engine, *_ = shardspeed.initialize(model=model, config=conf, mpu=unit)

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    finish = getattr(engine.strategy, "wait_params", lambda: None)
    info = {"micro": engine.train_micro_batch_size_per_gpu()}
    return step, finish, unit.get_data_parallel_rank(), unit.get_data_parallel_world_size(), info


def _torch_step(model, opt, ctx=None):
    import contextlib

    def step(x, y):
        with ctx() if ctx else contextlib.nullcontext():
            loss = model(x, y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_torch_tp(args, cfg, plain):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    model = TPGPT(cfg, plain)
    plan = {"tok": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(cfg.layers):
        plan.update({f"blocks.{i}.{n}": ColwiseParallel() for n in ("q", "k", "v", "fc")})
        plan.update({f"blocks.{i}.{n}": RowwiseParallel() for n in ("proj", "out")})
        if args.shared_qkv_input:  # ln1's output enters the tensor-parallel region once, as a DTensor:
            # q, k and v's partial input gradients add up on it, and one all-reduce (not three) settles them
            plan[f"blocks.{i}.ln1"] = PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Replicate(), use_local_output=False)
    parallelize_module(model, mesh["tp"], plan)
    # both shard the [vocab, hidden] weight on dim 0 over "tp": the same DTensor can serve both again
    tok, head = model.tok.weight, model.head.weight
    assert tok.placements == head.placements and torch.equal(tok.to_local(), head.to_local())
    model.head.weight = model.tok.weight
    for blk in model.blocks:
        blk.heads = cfg.heads // args.tp
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    assert model.head.weight is model.tok.weight, "the tie did not survive fully_shard"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    info = {"micro": args.global_batch // mesh["dp"].size(), "tie_kept": True,
            "n_params": len(list(model.parameters()))}
    return _torch_step(model, opt, loss_parallel), lambda: None, mesh["dp"].get_local_rank(), mesh["dp"].size(), info


def run_fsdp2(args, cfg, plain):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = plain
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert model.head.weight is model.tok.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    return _torch_step(model, opt), lambda: None, dist.get_rank(), world, {"micro": args.global_batch // world}


def profile_steps(step, finish, first: int, args, rank: int) -> dict:
    """A few steps under torch.profiler, split by the self CPU time of the events (indicative: the
    profiler adds its own overhead):
    - ``aten_s``: aten ops, i.e. compute and copies;
    - ``comm_s``: collectives and waiting on them: c10d / functional-collective ops (wait_tensor),
      FSDP2's all-gather and reduce records, and shardspeed's region mappings (_ReduceFromRegion,
      _CopyToRegionBackward, ...) whose self time is the blocking all-reduce's wait (torch.distributed
      waits on a Work outside any op, so the wait lands in whatever region called it);
    - ``rest_s``: the step's wall time minus both: Python (module hooks, DTensor's dispatch, the
      engine) and waits outside any named region (e.g. a ZeRO reducer's).
    Rank 0 also writes the top 40 events to benchmarks/out/tp_profile_<run>.txt."""
    import torch.distributed as dist
    from common import OUT
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(first, first + args.profile_steps):
            step(i)
        finish()
        wall = (time.perf_counter() - start) / args.profile_steps
    avgs = prof.key_averages()

    def is_comm(name: str) -> bool:
        return not name.startswith("aten::") and any(
            k in name for k in ("c10d", "gloo", "FSDP::all_gather", "FSDP::post_backward_reduce", "Region",
                                "Sequence", "wait"))

    per_step = 1e6 * args.profile_steps
    comm = sum(e.self_cpu_time_total for e in avgs if is_comm(e.key)) / per_step
    aten = sum(e.self_cpu_time_total for e in avgs if e.key.startswith("aten::")) / per_step
    if rank == 0:
        os.makedirs(OUT, exist_ok=True)
        name = f"tp_profile_{args.mode}{args.stage if args.mode == 'shardspeed' else ''}.txt"
        with open(os.path.join(OUT, name), "w") as f:
            f.write(avgs.table(sort_by="self_cpu_time_total", row_limit=40))
    return {"step_s": wall, "aten_s": aten, "comm_s": comm, "rest_s": wall - aten - comm,
            "aten_calls": sum(e.count for e in avgs if e.key.startswith("aten::")) / args.profile_steps}


def main():
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["shardspeed", "torch-tp", "fsdp2"], required=True)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--count-steps", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler after the counted ones")
    ap.add_argument("--shared-qkv-input", action="store_true",
                    help="torch-tp: ln1's output as one Replicate DTensor for q, k and v (one backward all-reduce "
                         "instead of one per projection)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab=args.vocab, seq=args.seq, layers=args.layers, hidden=args.hidden, heads=args.heads,
                    tie_embeddings=True)
    plain = plain_gpt(cfg)
    plain_loss = None
    if int(os.environ["RANK"]) == 0:  # the unsliced single-process model on the whole first batch
        with torch.no_grad():
            plain_loss = plain(*synthetic_batch(0, args.global_batch, cfg.seq, cfg.vocab)).item()
    runner = {"shardspeed": run_shardspeed, "torch-tp": run_torch_tp, "fsdp2": run_fsdp2}[args.mode]
    step_fn, finish, dp_rank, dp_size, info = runner(args, cfg, plain)
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = args.global_batch // dp_size

    def step(i):
        x, y = synthetic_batch(i, args.global_batch, cfg.seq, cfg.vocab)
        return step_fn(x[dp_rank * micro:(dp_rank + 1) * micro], y[dp_rank * micro:(dp_rank + 1) * micro])

    def sync_max(t):
        v = torch.tensor([t])
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.item()

    def mean_loss(loss):  # every rank of a data-parallel replica holds its replica's loss
        v = loss.detach().float().reshape(1)
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        dist.all_reduce(v)
        return v.item() / world

    # Note: what a step time holds (dp_worker.py): barrier to barrier with in-flight work finished inside,
    # then the loop's wall time with no barrier between steps
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = step(i)
        finish()
        t = sync_max(time.perf_counter() - start)
        losses.append(mean_loss(loss))
        if i >= args.warmup:
            times.append(t)
    dist.barrier()
    start = time.perf_counter()
    n0 = args.warmup + args.steps
    for i in range(n0, n0 + args.steps):
        loss = step(i)
    finish()
    dist.barrier()
    wall = sync_max(time.perf_counter() - start) / args.steps
    last_loss = mean_loss(loss)
    # bytes: a few more steps under the counter (slow: every op goes through Python), and shardspeed's
    # own comm log over the same steps as a cross-check
    log = None
    if args.mode == "shardspeed":
        from shardspeed.comm import collectives, stats

        log = stats.CommStats()
        collectives.add_observer(log)
    counter = CollectiveCounter()
    dist.barrier()
    with counter:
        for i in range(n0 + args.steps, n0 + args.steps + args.count_steps):
            step(i)
        finish()
    counted = counter.per_step(args.count_steps)
    if log is not None:
        collectives.remove_observer(log)
        counted["shardspeed_comm_log"] = {op: {"calls": s.calls / args.count_steps, "bytes": s.bytes / args.count_steps}
                                          for op, s in log.ops.items()}
    if args.profile_steps:
        counted["profile"] = profile_steps(step, finish, n0 + args.steps + args.count_steps, args, rank)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, counted)
    if rank == 0:
        mode = args.mode + ("-shared-qkv" if args.shared_qkv_input else "")
        append_result("tp", {"mode": mode, "stage": args.stage if args.mode == "shardspeed" else None,
                             "tp": args.tp if args.mode != "fsdp2" else 1, "dp": dp_size, "tag": args.tag,
                             "config": cfg.__dict__, "global_batch": args.global_batch, "info": info,
                             "median_step_s": median(times), "wall_step_s": wall, "times": times,
                             "losses": losses, "last_loss": last_loss, "plain_loss_step1": plain_loss,
                             "comm_per_rank": per_rank})
        print(json.dumps({"mode": args.mode, "wall": wall, "b2b": median(times), "loss1": losses[0],
                          "plain1": plain_loss, "bytes_rank0": counted["bytes"], "calls_rank0": counted["calls"]}))


if __name__ == "__main__":
    main()
