"""Pipeline p2p round trip: ``PipeComm.exchange`` against bare ``isend``/``irecv``, 2 ranks, no compute.

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_p2p.py [--iters 300]

One round trip is what a P = 2 pipeline's steady state does per micro-batch: stage 0 sends an
activation (a 2 x 128 x 256 fp32 tensor that needs grad, 256 KiB: the pipeline benchmark's
micro-batch) and receives its gradient, each in its own tick; stage 1 receives the activation (a
header and the payload it predicted: comm/p2p.py, Notes: one tick, two phases; predicted layouts)
and sends the gradient. "bare" is
the same two tensors with one isend/irecv each and no header. Both alternate three times; rank 0
prints ms per round trip. ``--profile RANK`` adds a cProfile of that rank's exchanges.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from shardspeed.comm.p2p import PipeComm, RecvObj, RecvTensors, SendObj, SendTensors, TensorSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--profile", type=int, default=-1, help="cProfile this rank's exchanges afterwards")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    comm = PipeComm(None, torch.device("cpu"))
    shape = (2, 128, 256)
    act = torch.randn(shape, requires_grad=True) * 1.0  # a non-leaf that needs grad, as a stage's output
    spec = [TensorSpec(shape, torch.float32, True)]
    grad, buf = torch.randn(shape), torch.empty(shape)

    def ours() -> None:
        if rank == 0:
            comm.exchange([SendObj(1, act, 0)])
            comm.release(comm.exchange([RecvTensors(1, spec, 0)])[0])
        else:
            x = comm.exchange([RecvObj(0, 0)])[0]
            comm.exchange([SendTensors(0, [grad], 0)])
            comm.release(x)
        comm.flush()

    def bare() -> None:
        if rank == 0:
            dist.isend(act.detach(), 1).wait()
            dist.irecv(buf, 1).wait()
        else:
            dist.irecv(buf, 0).wait()
            dist.isend(grad, 0).wait()

    for name, f in [("exchange", ours), ("bare", bare)] * 3:
        for _ in range(20):
            f()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            f()
        dist.barrier()
        if rank == 0:
            print(f"{name}: {(time.perf_counter() - start) / args.iters * 1e3:.3f} ms per round trip", flush=True)
    if args.profile >= 0:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        dist.barrier()
        prof.enable()
        for _ in range(args.iters):
            ours()
        prof.disable()
        if rank == args.profile:
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
