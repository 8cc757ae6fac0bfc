"""Train the RScan-style relevance model (model.py) on (function name, docstring) pairs mined from the
installed Python sources (data.py), with sparse embedding gradients, and report held-out AUC.

    shardspeed --num_procs 2 examples/rscan/train.py \\
        --deepspeed_config examples/rscan/ds_config.json --out runs/rscan

Every ``--eval_every`` steps the ranks score the held-out pairs (each a share, gathered to rank 0) and
rank 0 prints the AUC and writes it to the monitors as ``Eval/Samples/auc``; ``OUT/auc.jsonl`` keeps the
curve with training seconds (evaluation excluded), and ``--target_auc`` stops at the first evaluation
that reaches it. ``--grads`` picks the embedding's gradients:

- ``sparse`` (default): a ``sparse=True`` table with ``"sparse_gradients": true``: index slices through
  the reduction, the config's Adam updates the table lazily (touched rows only, as SparseAdam);
- ``flag``: a dense-gradient table with ``"sparse_gradients": true``: sparse communication, dense math;
- ``dense``: a dense-gradient table reduced densely.

``--zero_stage 1|2`` partitions the optimizer state (and at 2 the gradients) over the ranks, the
``sparse=True`` table included; the held-out AUC is the same as at stage 0.

LR range test (then train with the printed range as ``--onecycle MIN,MAX``):

    shardspeed --num_procs 2 examples/rscan/train.py --deepspeed_config examples/rscan/ds_config.json \\
        --range_test 1e-4,3e-2 --steps 200 --out runs/rscan_range

sweeps the lr linearly over ``--steps`` steps (``LRRangeTest``), then writes ``OUT/lr_range_test.png``
(loss against lr) and ``OUT/lr_range_test.json`` and prints the suggested ``OneCycle`` range.
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
from examples.rscan.data import RScanData, describe, load_pairs, split  # noqa: E402
from examples.rscan.metrics import auc  # noqa: E402
from examples.rscan.model import RScanConfig, RScanModel  # noqa: E402
from shardspeed import comm  # noqa: E402
from shardspeed.optim import one_cycle_config, range_test_params  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="RScan-style query/passage relevance with sparse gradients")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--eval_limit", type=int, default=None, help="held-out queries scored (default: all)")
    parser.add_argument("--target_auc", type=float, default=None, help="stop at the first evaluation >= this")
    parser.add_argument("--vocab", type=int, default=300_000, help="embedding rows (hashed vocabulary)")
    parser.add_argument("--emb", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--corpus", default="stdlib+torch", choices=["stdlib", "stdlib+torch"])
    parser.add_argument("--data_cache", default=None,
                        help="folder of the mined-pairs cache (default ~/.cache/shardspeed)")
    parser.add_argument("--grads", default="sparse", choices=["sparse", "flag", "dense"])
    parser.add_argument("--zero_stage", type=int, default=None, help="ZeRO stage 0, 1 or 2 (overrides the config's)")
    parser.add_argument("--train_batch_size", type=int, default=None,
                        help="global batch in queries (overrides the config's; the micro-batch stays)")
    parser.add_argument("--lr", type=float, default=None, help="constant lr (overrides the config's)")
    parser.add_argument("--onecycle", default=None, metavar="MIN,MAX",
                        help="OneCycle over --steps between these lrs (beta1 cycles 0.95 .. 0.85)")
    parser.add_argument("--range_test", default=None, metavar="MIN,MAX",
                        help="LR range test: sweep the lr from MIN to MAX over --steps, plot, suggest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/rscan")
    parser = shardspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} '{text}': expected two learning rates MIN,MAX, e.g. 1e-4,3e-2") from None
    return lo, hi


def make_config(args: argparse.Namespace) -> dict:
    """The JSON config with this run's choices applied: gradients mode, lr or schedule, monitor folder."""
    if not args.deepspeed_config:
        raise SystemExit("train.py needs --deepspeed_config (e.g. examples/rscan/ds_config.json)")
    with open(args.deepspeed_config) as f:
        cfg = json.load(f)
    cfg["sparse_gradients"] = args.grads != "dense"
    if args.lr is not None:
        cfg["optimizer"]["params"]["lr"] = args.lr
    if args.zero_stage is not None:
        cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": args.zero_stage}
    if args.train_batch_size is not None:
        cfg["train_batch_size"] = args.train_batch_size
        cfg.pop("gradient_accumulation_steps", None)
    if args.range_test and args.onecycle:
        raise SystemExit("--range_test and --onecycle exclude each other: run the range test first")
    if args.range_test:
        lo, hi = _pair(args.range_test, "--range_test")
        cfg["scheduler"] = {"type": "LRRangeTest", "params": range_test_params(lo, hi, args.steps)}
    elif args.onecycle:
        lo, hi = _pair(args.onecycle, "--onecycle")
        cfg["scheduler"] = one_cycle_config(lo, hi, args.steps)
    if cfg.get("csv_monitor", {}).get("enabled"):
        cfg["csv_monitor"] = {**cfg["csv_monitor"], "output_path": os.path.join(args.out, "monitor")}
    return cfg


def local_rows(batch: tuple[torch.Tensor, ...], dp_rank: int, micro: int, m: int, gas: int):
    """This rank's micro-batch ``m``: queries ``[(dp_rank * gas + m) * micro, +micro)`` of the global batch,
    each with its positive and negative row."""
    lo = 2 * (dp_rank * gas + m) * micro
    return tuple(t[lo:lo + 2 * micro] for t in batch)


@torch.no_grad()
def evaluate(engine, eval_set: tuple[torch.Tensor, ...], chunk: int = 2048) -> float:
    """Held-out AUC: each rank scores a contiguous share, rank 0 joins them (every rank gets the value)."""
    model = engine.module
    q, p, y = eval_set
    rank, world = comm.get_rank(), comm.get_world_size()
    share = -(-len(y) // world)
    lo, hi = rank * share, min(len(y), (rank + 1) * share)
    scores = [model.score(q[i:min(i + chunk, hi)], p[i:min(i + chunk, hi)]) for i in range(lo, hi, chunk)]
    mine = torch.cat(scores) if scores else torch.empty(0)
    return auc(torch.cat(comm.all_gather_object(mine)), y)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = make_config(args)
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise SystemExit(f"zero_optimization.stage {stage}: this example evaluates the full model on every rank; "
                         "use stage 0, 1 or 2")
    train_pairs, held_pairs = split(load_pairs(args.corpus, args.data_cache))
    train = RScanData(train_pairs, args.vocab)
    eval_set = RScanData(held_pairs, args.vocab).eval_set(args.eval_limit, seed=args.seed)
    torch.manual_seed(args.seed)
    model = RScanModel(RScanConfig(args.vocab, args.emb, args.hidden, sparse=args.grads == "sparse"))
    engine, _, _, _ = shardspeed.initialize(model=model, config=cfg)
    rank, dp = comm.get_rank(), engine.dp_world_size
    micro, gas, batch = (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                         engine.train_batch_size())
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training RScan ({n_params / 1e6:.2f}M parameters, embedding {args.vocab} x {args.emb}, "
              f"{args.grads} gradients) on {describe(train_pairs, held_pairs)}; {len(eval_set[2])} held-out "
              f"scores; {args.steps} steps of {batch} queries on {dp} ranks, ZeRO stage {stage}", flush=True)
    curve, losses = [], []
    trained = 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            value = evaluate(engine, eval_set)
            curve.append({"step": step, "samples": step * batch, "train_s": trained, "auc": value})
            engine.monitor.write_events([("Eval/Samples/auc", value, step * batch)])
            if rank == 0:
                print(f"step {step}/{args.steps} held-out AUC {value:.4f} ({trained:.1f} s training)", flush=True)
            if args.target_auc is not None and value >= args.target_auc:
                break
        if step == args.steps:
            break
        start = time.perf_counter()
        whole = train.train_batch(step, batch, seed=args.seed)
        step_loss = 0.0
        for m in range(gas):
            loss = engine(*local_rows(whole, engine.topo.dp_rank, micro, m, gas))
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / gas
        trained += time.perf_counter() - start
        if args.range_test:
            # the global batch's loss, not rank 0's share: every rank's micro-batches are the same size,
            # so the mean of the ranks' means is the global mean (outside the timed window)
            total = torch.tensor([step_loss], dtype=torch.float64)
            comm.all_reduce(total, group=engine.topo.dp_group)
            losses.append(float(total) / dp)
    if rank == 0:
        with open(os.path.join(args.out, "auc.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in curve)
        last = curve[-1]
        print(f"final held-out AUC {last['auc']:.4f} after {last['step']} steps, {last['samples']} queries, "
              f"{last['train_s']:.1f} s training ({last['samples'] / max(last['train_s'], 1e-9):.0f} queries/s)")
    if args.range_test and rank == 0:
        _range_report(args, cfg, losses)


def _range_report(args: argparse.Namespace, cfg: dict, losses: list[float]) -> None:
    from shardspeed.optim.schedules import LRRangeTest
    from shardspeed.utils.lr_range import report

    params = cfg["scheduler"]["params"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=params["lr_range_test_min_lr"])
    sched = LRRangeTest(opt, **params)
    lrs = [sched.lr_at(i)[0] for i in range(len(losses))]  # the lr each step trained with
    try:
        report(lrs, losses, os.path.join(args.out, "lr_range_test.png"),
               title=f"RScan LR range test ({len(losses)} steps, batch {cfg['train_batch_size']})")
    except ValueError as e:  # a sweep with nothing to read: say why, without a traceback
        raise SystemExit(f"LR range test --range_test {args.range_test} over {len(losses)} steps: {e}") from None


if __name__ == "__main__":
    main()
