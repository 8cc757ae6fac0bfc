"""Train the pipeline GPT (model.py) on the Python documentation that ships with Python (char-level,
as ``examples/gpt_demo.py``) with pipeline stages P, tensor slicing T inside each stage and ZeRO data
parallelism D = ranks / (P * T) across the pipelines.

    python -m shardspeed.launcher --num_procs 4 examples/pipeline_gpt/train.py --pp 2 \\
        --deepspeed_config examples/pipeline_gpt/ds_config.json                 # P=2 x D=2
    python -m shardspeed.launcher --num_procs 8 examples/pipeline_gpt/train.py --pp 2 --tp 2 \\
        --deepspeed_config examples/pipeline_gpt/ds_config.json                 # P=2 x T=2 x D=2

Each ``engine.train_batch(it)`` runs ``gradient_accumulation_steps`` micro-batches through the 1F1B
schedule and steps once; it returns the step's mean loss on every rank. Rank 0 prints the loss,
tokens/s and the validation loss before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import shardspeed  # noqa: E402
from examples.gpt_demo import CharWindows, load_text  # noqa: E402
from examples.gpt_model import GPTConfig  # noqa: E402
from examples.pipeline_gpt.model import pipeline_gpt  # noqa: E402
from shardspeed import comm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages P")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size T inside each stage")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="runs/pipeline_gpt")
    parser = shardspeed.add_config_arguments(parser)
    args = parser.parse_args()
    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    text = load_text()
    chars = sorted(set(text))
    vocab = -(-len(chars) // args.tp) * args.tp  # padded to a multiple of T: each rank holds whole rows
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(ids))
    cfg = GPTConfig(vocab=vocab, seq=64, layers=args.layers, hidden=128, heads=4)
    model = pipeline_gpt(cfg, topology=unit.topology(), tp=args.tp)
    with open(args.deepspeed_config) as f:
        ds = json.load(f)
    d = comm.get_world_size() // (args.pp * args.tp)
    batch = ds.get("train_batch_size") or ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * d
    train = CharWindows(ids[:split], cfg.seq, args.steps * batch, seed=1)
    val = CharWindows(ids[split:], cfg.seq, 4 * batch, seed=2)
    engine, _, loader, _ = shardspeed.initialize(args=args, model=model, training_data=train, mpu=unit)
    rank = comm.get_rank()
    if rank == 0:
        print(f"training a pipelined char-GPT ({cfg.layers} blocks, hidden {cfg.hidden}, vocab {vocab}, "
              f"{len(model.partitions()) - 1} stages, partition {model.partitions()}): P={args.pp} x T={args.tp} x "
              f"D={d}, {args.steps} steps of {engine.gradient_accumulation_steps()} micro-batches of "
              f"{engine.train_micro_batch_size_per_gpu()} x {cfg.seq} chars per pipeline", flush=True)

    def validate() -> float:
        # this replica's share of the validation windows, in micro-batches; eval_batch reads
        # gradient_accumulation_steps of them and returns their mean loss
        micro, dp = engine.train_micro_batch_size_per_gpu(), unit.get_data_parallel_rank()
        mine = [val[i] for i in range(dp, len(val), d)]
        batches = [tuple(torch.stack(t) for t in zip(*mine[j:j + micro], strict=True))
                   for j in range(0, len(mine) - micro + 1, micro)]
        n = len(batches) // engine.gradient_accumulation_steps()
        it = iter(batches)
        return sum(float(engine.eval_batch(it)) for _ in range(n)) / max(n, 1)

    val_before = validate()
    it = iter(shardspeed.RepeatingLoader(loader))
    every = max(1, args.steps // 6)
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        losses.append(float(engine.train_batch(it)))
        if rank == 0 and (step == 1 or step % every == 0 or step == args.steps):
            spent = time.perf_counter() - start
            tokens = step * engine.train_batch_size() * cfg.seq
            print(f"step {step}/{args.steps} loss {losses[-1]:.3f} ({tokens / spent:.0f} tokens/s, {spent:.1f} s)",
                  flush=True)
    elapsed = time.perf_counter() - start
    val_after = validate()
    engine.save_checkpoint(os.path.join(args.out, "checkpoint"))  # every rank: it is a collective
    if rank == 0:
        tokens = args.steps * engine.train_batch_size() * cfg.seq
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; validation {val_before:.3f} -> {val_after:.3f}; "
              f"{tokens / elapsed:.0f} tokens/s over {elapsed:.1f} s; checkpoint {args.out}/checkpoint "
              f"(keyed by layer index: loads at any P, T, D)", flush=True)


if __name__ == "__main__":
    main()
