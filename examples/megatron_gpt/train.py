"""Train the tensor-parallel GPT (model.py) on the Python documentation that ships with Python, with
tensor slicing inside each group of T ranks and ZeRO data parallelism across the groups: the talk's
Turing-NLG recipe (Megatron-style slicing x ZeRO stage 1) in miniature.

    shardspeed --num_procs 4 examples/megatron_gpt/train.py --tp 2 \\
        --deepspeed_config examples/megatron_gpt/ds_config.json --out runs/megatron_gpt

4 ranks, T = 2: two data-parallel replicas, each a pair of ranks holding half of every block. Rank 0
prints the loss, validation loss before and after, tokens/s and each rank's model-state bytes.
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
from examples.gpt_demo import CharWindows, evaluate, load_text  # noqa: E402
from examples.gpt_model import GPTConfig  # noqa: E402
from examples.megatron_gpt.model import ParallelGPT  # noqa: E402
from shardspeed import comm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size T (divides the number of ranks)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="runs/megatron_gpt")
    parser = shardspeed.add_config_arguments(parser)
    args = parser.parse_args()
    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=args.tp)
    text = load_text()
    chars = sorted(set(text))
    vocab = -(-len(chars) // args.tp) * args.tp  # padded to a multiple of T: each rank holds whole rows
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(ids))
    cfg = GPTConfig(vocab=vocab, seq=64, layers=4, hidden=128, heads=4, tie_embeddings=True)
    torch.manual_seed(0)  # the same full weights on every rank, whatever T (each keeps its slice)
    model = ParallelGPT(cfg)
    with open(args.deepspeed_config) as f:
        batch = json.load(f)["train_batch_size"]
    train = CharWindows(ids[:split], cfg.seq, args.steps * batch, seed=1)
    val = CharWindows(ids[split:], cfg.seq, 64, seed=2)
    engine, _, loader, _ = shardspeed.initialize(args=args, model=model, training_data=train, mpu=unit)
    rank = comm.get_rank()
    if rank == 0:
        full = sum(p.numel() * (args.tp if getattr(p, "tensor_model_parallel", False) else 1)
                   for p in model.parameters())
        print(f"training a tensor-parallel char-GPT of {full / 1e6:.2f}M parameters: T={args.tp} x "
              f"D={engine.dp_world_size} (ZeRO stage {engine.config.zero_optimization.stage}), {args.steps} steps "
              f"of batch {engine.train_batch_size()} x {cfg.seq} chars, precision {engine.policy.compute_name}",
              flush=True)
    val_before = evaluate(engine, val, batches=4)
    start, losses, said = time.perf_counter(), [], 0
    every = max(1, args.steps // 6)
    for x, y in shardspeed.RepeatingLoader(loader):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.float().item())
        step = engine.global_steps
        if rank == 0 and step != said and (step == 1 or step % every == 0 or step == args.steps):
            said, spent = step, time.perf_counter() - start
            print(f"step {step}/{args.steps} loss {losses[-1]:.3f} (last micro-batch; {spent:.1f} s)", flush=True)
        if step >= args.steps:
            break
    elapsed = time.perf_counter() - start
    val_after = evaluate(engine, val, batches=4)
    engine.save_checkpoint(os.path.join(args.out, "checkpoint"))
    mems = comm.all_gather_object(engine.memory_breakdown())
    if rank == 0:
        tokens = args.steps * engine.train_batch_size() * cfg.seq
        print(f"validation loss {val_before:.3f} -> {val_after:.3f}; {tokens / elapsed:.0f} tokens/s, "
              f"{elapsed:.1f} s")
        for r, m in enumerate(mems):
            print(f"  rank {r}: parameters {m['parameters'] / 2**20:.2f} MiB, gradients {m['gradients'] / 2**20:.2f} "
                  f"MiB, optimizer {m['optimizer_states'] / 2**20:.2f} MiB")
        print(f"  checkpoint: {args.out}/checkpoint (loads at any T, D and ZeRO stage)")


if __name__ == "__main__":
    main()
