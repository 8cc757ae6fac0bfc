"""One rank of the scale benchmark: build a GPT at hidden 2048 under zero.Init, train 2 steps with
ZeRO stage 3, report step times and peak memory. Started by bench_scale.py through the launcher."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result  # noqa: E402
from mem_worker import _count  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--zero", default="{}", help="JSON merged into zero_optimization")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import shardspeed
    from shardspeed import comm

    start = time.perf_counter()
    shardspeed.init_distributed()
    cfg = GPTConfig(vocab=8192, seq=128, layers=args.layers, hidden=2048, heads=16)
    config = {"train_batch_size": 2, "steps_per_print": None,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
              "zero_optimization": {"stage": 3, **json.loads(args.zero)}}
    torch.manual_seed(1234)
    offload = "offload_param" in config["zero_optimization"]
    if offload:
        config["aio"] = {"thread_count": 2}  # 2 threads read this disk fastest (bench_offload.py bandwidth)
    with shardspeed.zero.Init(config_dict_or_path=config, remote_device="nvme" if offload else None):
        model = GPT(cfg)
    engine, *_ = shardspeed.initialize(model=model, config=config)
    n = _count(cfg)
    init_s = time.perf_counter() - start
    rank = comm.get_rank()
    times, losses = [], []
    for step in range(2):
        x, y = synthetic_batch(step, 2, cfg.seq, cfg.vocab)
        t = time.perf_counter()
        loss = engine(x[rank:rank + 1], y[rank:rank + 1])
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    mem = engine.memory_breakdown()
    files = [f for f in (getattr(engine.optimizer_swapper, "file", None),
                         getattr(engine.strategy.param_tier, "file", None)) if f is not None]
    mem["swap_bytes_read"] = sum(f.bytes_read for f in files)  # over init and both steps
    mem["swap_bytes_written"] = sum(f.bytes_written for f in files)
    mem["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = comm.all_gather_object(mem)
    if rank == 0:
        mode = "shardspeed-z3" + ("-oib" if config["zero_optimization"].get("optimizer_in_backward") else "")
        mode += "-nvme" if offload else ""
        append_result("scale", {"mode": mode, "layers": args.layers, "n_params": n, "tag": args.tag,
                                "init_s": init_s, "step_s": times, "losses": losses, "per_rank": rows})


if __name__ == "__main__":
    main()
