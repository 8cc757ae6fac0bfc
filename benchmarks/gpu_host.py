"""On a GPU, one rank: GPT-2 small (163M parameters, untied head, seq 1024, 8 sequences), bf16 compute
with fp32 masters, AdamW. Modes: ``ss0`` / ``ss3`` (shardspeed ZeRO-0 / 3), ``fsdp2`` (fully_shard per
block and the root, MixedPrecisionPolicy(bf16, fp32 reduce)), ``plain`` (autocast bf16, fused AdamW).

    python3 benchmarks/gpu_host.py ss3        # one JSON line: step_ms, host_*_ms, peak_MiB, peak_{phase}_MiB

step_ms: 20 steps free-running after 5 warm-up, synchronised at both ends only. host_*_ms: the time
each call (forward, backward, step) takes to return, with no synchronisation inside, then the time
to drain the GPU: a phase whose host time is close to the step's is host-bound (the GPU waits on
it). DEV=cpu runs the same logic on a tiny model (a check of the script, not a measurement).
peak_fwd/bwd/step_MiB: the most allocated during each phase of one more step; rest_MiB: after it.
gpu_check.py's ``host`` section runs the modes in turn (rounds), each in a fresh process."""

import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
MODE = sys.argv[1]
DEV = os.environ.get("DEV", "cuda")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(29650 + hash(MODE) % 100), SHARDSPEED_ACCELERATOR=DEV)

import torch  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402


def build(mode: str, net: torch.nn.Module, micro: int):
    """(forward, backward, step) for ``mode``."""
    if mode.startswith("ss"):
        import shardspeed

        config = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "steps_per_print": None,
                  "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
                  "zero_optimization": {"stage": int(mode[2:])}, "bf16": {"enabled": True}}
        engine, *_ = shardspeed.initialize(model=net, config=config)
        return (lambda x, y: engine(x, y)), engine.backward, engine.step
    import torch.distributed as dist

    dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
    net = net.to(DEV)
    if mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for b in net.blocks:
            fully_shard(b, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01, fused=DEV == "cuda")

    def fwd(x, y):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=mode == "plain"):
            return net(x, y)

    def stp():
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd, (lambda loss: loss.backward()), stp


def main() -> None:
    torch.manual_seed(0)
    cfg = (GPTConfig(vocab=50304, seq=1024, layers=12, hidden=768, heads=12) if DEV == "cuda"
           else GPTConfig(vocab=256, seq=32, layers=4, hidden=64, heads=4))
    micro = 8
    fwd, bwd, stp = build(MODE, GPT(cfg), micro)
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    x, y = synthetic_batch(0, micro, cfg.seq, cfg.vocab)
    x, y = x.to(DEV), y.to(DEV)

    def step():
        bwd(fwd(x, y))
        stp()

    for _ in range(5):
        step()
    sync()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    free = (time.perf_counter() - t0) / n
    ph = {"fwd": 0.0, "bwd": 0.0, "step": 0.0, "drain": 0.0}
    for _ in range(n):
        a = time.perf_counter()
        loss = fwd(x, y)
        b = time.perf_counter()
        bwd(loss)
        c = time.perf_counter()
        stp()
        d = time.perf_counter()
        sync()
        e = time.perf_counter()
        ph["fwd"] += b - a
        ph["bwd"] += c - b
        ph["step"] += d - c
        ph["drain"] += e - d
    peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else 0
    # where the peak is: the most allocated during each phase of one more step, and at rest after it
    phases = {}
    cuda = DEV == "cuda"

    def mark(name: str) -> None:
        phases[f"peak_{name}_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = fwd(x, y)
    mark("fwd")
    bwd(loss)
    mark("bwd")
    stp()
    mark("step")
    sync()
    phases["rest_MiB"] = round(torch.cuda.memory_allocated() / 2**20) if DEV == "cuda" else 0
    print(json.dumps({"mode": MODE, "step_ms": round(free * 1e3, 2), "loss": float(loss),
                      **{f"host_{k}_ms": round(v / n * 1e3, 2) for k, v in ph.items()}, "peak_MiB": round(peak),
                      **phases}))


if __name__ == "__main__":
    main()
