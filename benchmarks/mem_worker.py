"""One rank of the memory benchmark: steady model-state bytes per parameter, and peak RSS.
Started by bench_memory.py through the launcher."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result, batch  # noqa: E402

from examples.gpt_model import GPT, GPTConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--zero-init", action="store_true", help="stage 3: build the model under zero.Init")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import shardspeed
    from shardspeed import comm

    shardspeed.init_distributed()
    rss_start = _rss()
    cfg = GPTConfig(vocab=8192, seq=128, layers=args.layers, hidden=512, heads=8)
    config = {"train_batch_size": 8, "steps_per_print": None, "bf16": {"enabled": args.dtype == "bf16"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
              "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 25_000_000 // 4,
                                    "stage3_prefetch_bucket_size": 5_000_000,
                                    "stage3_max_live_parameters": 30_000_000}}
    torch.manual_seed(1234)
    if args.zero_init:
        with shardspeed.zero.Init(config_dict_or_path=config):
            model = GPT(cfg)
    else:
        model = GPT(cfg)
    n = _count(cfg)
    engine, *_ = shardspeed.initialize(model=model, config=config)
    engine_rss = _rss()
    rank = comm.get_rank()
    micro = engine.train_micro_batch_size_per_gpu()
    for step in range(3):
        x, y = batch(step, 8, cfg)
        engine.backward(engine(x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]))
        engine.step()
    mem = engine.memory_breakdown()
    mem["peak_rss"] = engine.accelerator.max_memory_allocated()
    mem["rss_start"], mem["rss_after_init"] = rss_start, engine_rss
    rows = comm.all_gather_object(mem)
    if rank == 0:
        append_result("memory", {"stage": args.stage, "dtype": args.dtype, "n_params": n, "tag": args.tag,
                                 "zero_init": args.zero_init, "per_rank": rows})


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _count(cfg: GPTConfig) -> int:
    """Parameters of the GPT with these dimensions, without building it."""
    d, v, s, layers = cfg.hidden, cfg.vocab, cfg.seq, cfg.layers
    block = 4 * d + 3 * d * d + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return v * d + s * d + layers * block + 2 * d + (0 if cfg.tie_embeddings else v * d)


if __name__ == "__main__":
    main()
