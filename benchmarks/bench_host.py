"""Host time per step of ZeRO-3 against FSDP2 and DeepSpeed, on a model whose compute is negligible.

    .venv/bin/python benchmarks/bench_host.py [--reps 2] [--rounds 8] [--steps 10] [--ranks 1]
    .venv/bin/python benchmarks/bench_host.py --table --tag run      # the table of earlier rows

On a GPU a step's kernels run while the host prepares the next ones; when the host is slower (a
small model per GPU, or ZeRO-3's hooks around every unit), the GPU waits on it, and the step takes
the host's time. This measures that host time directly: a GPT of 12 blocks of hidden 64 (seq 16,
2 sequences per rank), whose arithmetic is a small part of a step, so a step's time is what each
library's Python, hooks, collectives and optimizer cost around it. The same model, bf16 recipe
(bf16 compute, fp32 masters and reduction) and AdamW everywhere:

- ``plain``: a torch loop, autocast bf16, fused AdamW (the floor: autograd, kernels, optimizer);
- ``shardspeed-0`` / ``shardspeed-3``: ZeRO stage 0 / 3, ``bf16.enabled``, persistence threshold 0
  (every unit gathered and released each step, as at GPT-2 scale);
- ``fsdp2``: ``fully_shard`` per block and the root, MixedPrecisionPolicy(bf16, fp32 reduce);
- ``deepspeed-3``: DeepSpeed ZeRO-3, ``bf16.enabled``, persistence threshold 0, its FusedAdam from the
  config's AdamW (DeepSpeed's CPU build picks torch's AdamW when its op is not compiled).

Everything runs in DeepSpeed's venv (the same torch wheel; shardspeed imported from this tree), all
modes interleaved in one launch: ``--rounds`` turns of ``--steps`` steps per mode, the order rotated
every turn. A turn's time is its wall clock over its steps (no barrier inside; at ``--ranks`` > 1 a
barrier before and after, so nothing is left in flight); its CPU time is this process's
``time.process_time`` over the same steps. Paired ratio: median over turns of a mode's s/step over
shardspeed-3's in the same turn.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, append_result, median, read_results  # noqa: E402

MODES = ["plain", "shardspeed-0", "shardspeed-3", "fsdp2", "deepspeed-3"]
# also selectable with --modes (stages 1-2: one unit-free gradient path each, as DeepSpeed's)
ALL_MODES = ["plain", "shardspeed-0", "shardspeed-1", "shardspeed-2", "shardspeed-3", "fsdp2", "deepspeed-1",
             "deepspeed-2", "deepspeed-3"]
LR, WD, MICRO = 1e-3, 0.01, 2


def _model():
    import torch

    from examples.gpt_model import GPT, GPTConfig

    torch.manual_seed(1234)
    cfg = GPTConfig(vocab=256, seq=16, layers=12, hidden=64, heads=4)
    return GPT(cfg), cfg


def _build(mode: str, world: int):
    """``step(x, y) -> loss`` for ``mode`` on a fresh copy of the model."""
    import torch

    model, cfg = _model()
    if mode.startswith(("shardspeed", "deepspeed")):
        # one DeepSpeed config for both engines; DeepSpeed also needs clipping off (its default is 1.0)
        config = {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
                  "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0}}
        if mode.startswith("shardspeed"):
            import shardspeed

            engine, *_ = shardspeed.initialize(model=model, config={**config, "steps_per_print": None})
        else:
            import deepspeed

            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
                **config, "steps_per_print": 10**9, "gradient_clipping": 0.0})

        def step(x, y):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            return loss
    else:
        if mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kw = {"mesh": init_device_mesh("cpu", (world,)),
                  "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
            for blk in model.blocks:
                fully_shard(blk, **kw)
            fully_shard(model, **kw)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)

        def step(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "plain"):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    return step, cfg


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from examples.gpt_model import synthetic_batch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")  # shardspeed and FSDP2 join this process group
    rank, world = dist.get_rank(), dist.get_world_size()
    modes = args.modes.split(",")
    steps = {m: _build(m, world) for m in modes}
    launch = f"{os.getpid()}-{time.time():.0f}"

    def run(mode: str, first: int, n: int) -> tuple[float, float, float]:
        step, cfg = steps[mode]
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        for i in range(first, first + n):
            x, y = synthetic_batch(i, MICRO * world, cfg.seq, cfg.vocab)
            loss = step(x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO])
        dist.barrier()
        return (time.perf_counter() - t) / n, (time.process_time() - c) / n, float(loss)

    for m in modes:
        run(m, 0, args.warmup)
    for turn in range(args.rounds):
        k = turn % len(modes)
        for m in modes[k:] + modes[:k]:
            wall, cpu, loss = run(m, args.warmup + turn * args.steps, args.steps)
            if rank == 0:
                append_result("host", {"tag": args.tag, "launch": launch, "turn": turn, "mode": m, "ranks": world,
                                       "s_per_step": wall, "cpu_s_per_step": cpu, "loss": loss})


def table(tag: str) -> str:
    rows = [r for r in read_results("host") if r["tag"] == tag]
    if not rows:
        return f"no rows tagged {tag!r} in {os.path.join(OUT, 'host.jsonl')}"
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in rows)]
    turns: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        turns.setdefault((r["launch"], r["turn"]), {})[r["mode"]] = r
    ranks = sorted({r["ranks"] for r in rows})
    plain = median([r["s_per_step"] for r in rows if r["mode"] == "plain"]) if "plain" in modes else None
    out = [f"ranks {ranks}, {len(turns)} turns over {len({r['launch'] for r in rows})} launch(es)", "",
           "| mode | ms/step, median turn | CPU ms/step | over plain, ms | paired vs shardspeed-3 | loss, last turn |",
           "|---|---|---|---|---|---|"]
    for m in modes:
        mine = [r for r in rows if r["mode"] == m]
        s = median([r["s_per_step"] for r in mine])
        cpu = median([r["cpu_s_per_step"] for r in mine])
        over = f"{(s - plain) * 1e3:.2f}" if plain is not None else ""
        pair = [t[m]["s_per_step"] / t["shardspeed-3"]["s_per_step"] for t in turns.values()
                if m in t and "shardspeed-3" in t]
        ratio = f"{median(pair):.3f} ({min(pair):.2f}-{max(pair):.2f})" if pair else ""
        last = max(mine, key=lambda r: (r["launch"], r["turn"]))["loss"]
        out.append(f"| {m} | {s * 1e3:.2f} | {cpu * 1e3:.2f} | {over} | {ratio} | {last:.4f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="launches; the second reverses the order of modes")
    ap.add_argument("--rounds", type=int, default=8, help="turns per mode and launch")
    ap.add_argument("--steps", type=int, default=10, help="steps per turn")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    ap.add_argument("--table", action="store_true", help="print the table of --tag's rows, run nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.table:
        torchrun = os.path.join(args.ds_venv, "bin", "torchrun")
        if not os.path.exists(torchrun):
            sys.exit(f"no DeepSpeed venv at {args.ds_venv} (../shared/anchors/ says how to make one)")
        print("load before:", os.getloadavg(), flush=True)
        for rep in range(args.reps):
            modes = args.modes.split(",")
            modes = modes if rep % 2 == 0 else modes[::-1]
            cmd = [torchrun, "--nproc_per_node", str(args.ranks), "--master_port", str(_free_port()), __file__,
                   "--worker", "--modes", ",".join(modes), "--rounds", str(args.rounds), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--tag", args.tag]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu",
                   "SHARDSPEED_ACCELERATOR": "cpu"}
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        print("load after:", os.getloadavg())
    print(table(args.tag))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
