"""Train a small character-level GPT on the Python documentation that ships with Python
(``pydoc_data``: no download), on as many ranks as the launcher starts.

    shardspeed --num_procs 2 examples/gpt_demo.py --deepspeed_config examples/ds_config.json --out runs/demo

Rank 0 writes ``loss.png``, ``summary.txt`` and the trained weights to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import shardspeed  # noqa: E402
from examples.gpt_model import GPT, GPTConfig  # noqa: E402
from shardspeed import comm  # noqa: E402


def load_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


class CharWindows(torch.utils.data.Dataset):
    """Fixed-length windows of the text (inputs, next-character targets)."""

    def __init__(self, ids: torch.Tensor, seq: int, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids, self.seq = ids, seq
        self.starts = torch.randint(0, len(ids) - seq - 1, (count,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.ids[s:s + self.seq + 1]
        return chunk[:-1], chunk[1:]


@torch.no_grad()
def evaluate(engine, data: CharWindows, batches: int = 8) -> float:
    engine.eval()
    losses = []
    for b in range(batches):
        xs, ys = zip(*(data[i] for i in range(b * 16, (b + 1) * 16)), strict=False)
        losses.append(engine(torch.stack(xs), torch.stack(ys)).float().item())
    engine.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample(engine, prompt: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    engine.eval()
    out = prompt.clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        logits = engine(out[None, -seq:])[0, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=g)
        out = torch.cat([out, nxt])
    engine.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/demo")
    parser = shardspeed.add_config_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = load_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(ids))
    cfg = GPTConfig(vocab=len(vocab), seq=64, layers=4, hidden=128, heads=4)
    model = GPT(cfg)
    with open(args.deepspeed_config) as f:
        batch = json.load(f)["train_batch_size"]
    train = CharWindows(ids[:split], cfg.seq, args.steps * batch, seed=1)
    val = CharWindows(ids[split:], cfg.seq, 128, seed=2)
    engine, _, loader, _ = shardspeed.initialize(args=args, model=model, training_data=train)
    rank = comm.get_rank()
    if rank == 0:
        # Said before any step runs, so a newcomer knows at once what is being trained and how long.
        print(f"training a char-GPT of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({cfg.layers} layers, hidden {cfg.hidden}, vocab {len(vocab)}) for {args.steps} steps of batch "
              f"{engine.train_batch_size()} x {cfg.seq} chars on {engine.dp_world_size} ranks, "
              f"precision {engine.policy.compute_name}", flush=True)
    val_before = evaluate(engine, val)
    curve, start = [], time.perf_counter()
    every = max(1, args.steps // 10)
    for x, y in shardspeed.RepeatingLoader(loader):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.float().item()])
        comm.all_reduce(t)
        curve.append(t.item() / engine.dp_world_size)
        step = engine.global_steps
        if rank == 0 and (step == 1 or step % every == 0 or step == args.steps):
            spent = time.perf_counter() - start
            print(f"step {step}/{args.steps} loss {curve[-1]:.3f} ({spent:.1f} s, "
                  f"~{spent / step * (args.steps - step):.0f} s to go)", flush=True)
        if step >= args.steps:
            break
    elapsed = time.perf_counter() - start
    val_after = evaluate(engine, val)
    engine.save_checkpoint(os.path.join(args.out, "checkpoint"))  # every rank: it is a collective
    mem = engine.memory_breakdown()
    mem["peak_rss"] = engine.accelerator.max_memory_allocated()
    mems = comm.all_gather_object(mem)
    if rank == 0:
        write_report(args.out, curve, val_before, val_after, elapsed, engine, mems, vocab,
                     sample(engine, ids[split:split + 32], 120, cfg.seq), cfg.seq)
        torch.save(engine.module.state_dict(), os.path.join(args.out, "model.pt"))


def write_report(out, curve, val_before, val_after, elapsed, engine, mems, vocab, text_ids, seq) -> None:
    os.makedirs(out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(curve) + 1), curve, lw=1, label="train loss (mean over ranks)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(f"char-GPT on pydoc_data, {engine.dp_world_size} ranks, shardspeed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    samples_s = len(curve) * engine.train_batch_size() / elapsed
    lines = [
        "shardspeed demo summary",
        f"  steps {len(curve)}, batch {engine.train_batch_size()} x {seq} chars, "
        f"{engine.dp_world_size} ranks, precision {engine.policy.compute_name}",
        f"  loss: first step {curve[0]:.3f} -> last step {curve[-1]:.3f}; "
        f"validation {val_before:.3f} -> {val_after:.3f}",
        f"  throughput {samples_s:.1f} samples/s, {samples_s * seq:.0f} tokens/s, {elapsed:.1f} s total",
    ]
    for r, m in enumerate(mems):
        lines.append(f"  rank {r}: peak RSS {m['peak_rss'] / 2**20:.0f} MiB; parameters {m['parameters'] / 2**20:.1f} "
                     f"MiB, grads {m['gradients'] / 2**20:.1f} MiB, fp32 masters {m['master_parameters'] / 2**20:.1f}"
                     f" MiB, optimizer {m['optimizer_states'] / 2**20:.1f} MiB")
    lines.append("  sample: " + repr("".join(vocab[i] for i in text_ids.tolist())[-120:]))
    lines.append(f"  wrote {out}/loss.png, {out}/summary.txt, {out}/model.pt, {out}/checkpoint/")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
