"""One rank of the checkpoint benchmark, for shardspeed or (``--deepspeed``, run from the DeepSpeed
venv with torchrun) DeepSpeed: the same ~46M GPT, one training step, then timed save and load."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.deepspeed:
        import deepspeed as lib

        lib.init_distributed(dist_backend="gloo")
    else:
        import shardspeed as lib

        lib.init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank()
    cfg = GPTConfig(vocab=8192, seq=128, layers=12, hidden=512, heads=8)
    config = {"train_batch_size": 4, "steps_per_print": 10**9, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True}

    def engine():
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        return lib.initialize(model=model, optimizer=opt, config=config)[0]

    e = engine()
    x, y = synthetic_batch(0, 4, cfg.seq, cfg.vocab)
    e.backward(e(x[rank * 2:rank * 2 + 2], y[rank * 2:rank * 2 + 2]))
    e.step()
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
    dist.barrier()
    start = time.perf_counter()
    e.save_checkpoint(args.dir, tag="t")
    dist.barrier()
    save_s = time.perf_counter() - start
    f = engine()
    dist.barrier()
    start = time.perf_counter()
    f.load_checkpoint(args.dir, tag="t")
    dist.barrier()
    load_s = time.perf_counter() - start
    if rank == 0:
        size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(args.dir) for n in ns)
        n = sum(p.numel() for p in GPT(cfg).parameters())
        with open(args.out, "a") as fh:
            fh.write(json.dumps({"lib": "deepspeed" if args.deepspeed else "shardspeed", "stage": args.stage,
                                 "save_s": save_s, "load_s": load_s, "bytes": size, "n_params": n}) + "\n")
    dist.barrier()


if __name__ == "__main__":
    main()
