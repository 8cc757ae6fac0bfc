"""One script for a lent GPU machine: environment, parity on CUDA/NCCL, bf16 step time and MFU,
stage-3 memory per rank, and stage 3's host time and memory per phase against FSDP2 (gpu_host.py),
written to ``--out`` (markdown, with a JSON block) in under ~8 minutes. The lent image has torch but
not pydantic: carry its wheels (RESULTS.md, "GPU check").

    python benchmarks/gpu_check.py --out gpu_check.md          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick         # here: the same logic, tiny sizes, gloo

Each section runs in fresh processes (torch.multiprocessing, one per rank) so a crash or a hang in
one section is reported and the next one still runs; a global time budget skips what would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from examples.gpt_model import GPT, GPTConfig, synthetic_batch  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
TOL = 1e-5
PARITY_STEPS, PARITY_BATCH, LR, WD = 4, 8, 3e-3, 0.01
TINY = dict(vocab=64, seq=16, layers=2, hidden=32, heads=4)
STATE_KEYS = ("parameters", "gradients", "master_parameters", "optimizer_states", "buffers")


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- ranks ----------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, device: str, job: str, kwargs: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), SHARDSPEED_ACCELERATOR=device)
    if device == "cpu":
        torch.set_num_threads(1)
    result = {"parity": _parity_rank, "train": _train_rank}[job](**kwargs)
    if rank == 0:
        torch.save(result, out)


def _spawn(world: int, device: str, job: str, **kwargs: Any) -> Any:
    from shardspeed.comm.env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_rank_main, args=(world, free_port(), device, job, kwargs, out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def _config(stage: int, world: int, micro: int, bf16: bool = False) -> dict:
    return {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}


def _parity_rank(stage: int, zero_init: bool) -> dict:
    from tests.distributed.workloads import engine_run

    world = int(os.environ["WORLD_SIZE"])
    config = _config(stage, world, PARITY_BATCH // world)
    r = engine_run(int(os.environ["RANK"]), config, PARITY_STEPS, zero_init=zero_init)
    return {n: t.cpu() for n, t in r["params"].items()}


def _train_rank(model: dict, stage: int, bf16: bool, micro: int, warmup: int, steps: int) -> dict:
    import shardspeed
    from shardspeed.accelerator import get_accelerator
    from shardspeed.comm import barrier

    acc = get_accelerator()
    torch.manual_seed(0)
    cfg = GPTConfig(**model)
    net = GPT(cfg)
    params = sum(p.numel() for p in net.parameters())
    world = int(os.environ["WORLD_SIZE"])
    engine, *_ = shardspeed.initialize(model=net, config=_config(stage, world, micro, bf16))
    x, y = synthetic_batch(0, micro, cfg.seq, cfg.vocab)
    if acc.is_cuda:
        x, y = acc.pin_memory(x), acc.pin_memory(y)
    acc.reset_peak_memory_stats()

    def run(n: int) -> None:
        for _ in range(n):
            engine.backward(engine(x, y))
            engine.step()

    run(warmup)
    acc.synchronize()
    barrier()
    start = time.perf_counter()
    run(steps)
    acc.synchronize()
    barrier()
    seconds = (time.perf_counter() - start) / steps
    # model state at rest only: the breakdown also carries the step's high-water marks (peak_*, transient)
    state = {k: v for k, v in engine.memory_breakdown().items() if k in STATE_KEYS}
    return {"params": params, "step_s": seconds, "tokens_per_s": micro * world * cfg.seq / seconds,
            "peak_bytes": acc.max_memory_allocated(), "state_bytes": sum(state.values()), "world": world}


# -- reference ------------------------------------------------------------------------------------
def _reference(device: str) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch AdamW on the full batch, on the same device as the engine."""
    from tests.distributed.workloads import tiny_gpt

    model = tiny_gpt().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for step in range(PARITY_STEPS):
        x, y = synthetic_batch(step, PARITY_BATCH, TINY["seq"], TINY["vocab"])
        opt.zero_grad()
        model(x.to(device), y.to(device)).backward()
        opt.step()
    return {n: p.detach().cpu() for n, p in model.named_parameters()}


# -- sections -------------------------------------------------------------------------------------
def section_env(ctx: dict) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": ctx["device"],
            "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if ctx["device"] == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def section_parity(ctx: dict) -> dict:
    from tests.distributed.workloads import max_rel_diff

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be fp32, as the ranks are
    ref = _reference(ctx["device"])
    rows = []
    for world in ctx["worlds"]:
        for stage, zero_init in [(0, False), (1, False), (2, False), (3, False), (3, True)]:
            if ctx["left"]() < 60:
                rows.append({"world": world, "stage": stage, "zero_init": zero_init, "error": "skipped: budget"})
                continue
            name = f"world {world} stage {stage}{' zero.Init (built on CPU)' if zero_init else ''}"
            try:
                ours = _spawn(world, ctx["device"], "parity", stage=stage, zero_init=zero_init)
                diff = max_rel_diff(ours, ref)
                rows.append({"world": world, "stage": stage, "zero_init": zero_init, "max_rel_diff": diff,
                             "pass": diff < TOL})
                _log(f"  parity {name}: max rel diff {diff:.2e} {'PASS' if diff < TOL else 'FAIL'}")
            except Exception as e:  # report and go on to the next case
                rows.append({"world": world, "stage": stage, "zero_init": zero_init, "error": repr(e)[:500]})
                _log(f"  parity {name}: ERROR {e!r}")
    return {"tolerance": TOL, "rows": rows}


def _model(ctx: dict) -> dict:
    if ctx["quick"]:
        return dict(vocab=256, seq=64, layers=2, hidden=64, heads=4)
    return dict(vocab=50304, seq=1024, layers=12, hidden=768, heads=12)  # GPT-2 small, ~124M


def section_speed(ctx: dict) -> dict:
    rows = []
    world = max(ctx["worlds"])
    bf16 = ctx["device"] == "cuda"  # CPU bf16 may be emulated (CONVENTIONS.md): logic check only
    for stage in (0, 3):
        if ctx["left"]() < 90:
            rows.append({"stage": stage, "error": "skipped: budget"})
            continue
        try:
            r = _spawn(world, ctx["device"], "train", model=_model(ctx), stage=stage, bf16=bf16,
                       micro=2 if ctx["quick"] else 8, warmup=2 if ctx["quick"] else 5,
                       steps=3 if ctx["quick"] else 20)
            tflops = 6 * r["params"] * r["tokens_per_s"] / 1e12
            r.update(stage=stage, dtype="bf16" if bf16 else "fp32", tflops_total=tflops,
                     tflops_per_gpu=tflops / world, mfu=tflops / world / PEAK_BF16_TFLOPS)
            rows.append(r)
            _log(f"  stage {stage}: {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
                 f"{r['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {r['mfu']:.1%}")
        except Exception as e:
            rows.append({"stage": stage, "error": repr(e)[:500]})
            _log(f"  stage {stage}: ERROR {e!r}")
    return {"model": _model(ctx), "peak_tflops": PEAK_BF16_TFLOPS, "rows": rows,
            "flops_formula": "6 * params * tokens / time (no attention term)"}


def section_memory(ctx: dict) -> dict:
    rows = []
    for world in ctx["worlds"]:
        if ctx["left"]() < 60:
            rows.append({"world": world, "error": "skipped: budget"})
            continue
        try:
            r = _spawn(world, ctx["device"], "train", model=_model(ctx), stage=3, bf16=False,
                       micro=1, warmup=2, steps=1)
            theory = 16 * r["params"] / world
            r.update(theory_bytes=theory, peak_bytes_per_param=r["peak_bytes"] / r["params"],
                     state_bytes_per_param=r["state_bytes"] / r["params"])
            rows.append(r)
            _log(f"  stage 3, {world} rank(s): peak {r['peak_bytes'] / 2**20:.0f} MiB on rank 0, "
                 f"state {r['state_bytes'] / 2**20:.0f} MiB, theory 16 B/param/N = {theory / 2**20:.0f} MiB")
        except Exception as e:
            rows.append({"world": world, "error": repr(e)[:500]})
            _log(f"  memory {world} rank(s): ERROR {e!r}")
    return {"rows": rows, "note": "fp32 AdamW: 4 B param + 4 B grad + 8 B moments = 16 B/param, / N at stage 3; "
                                  "the peak adds activations and gathered units"}


def section_host(ctx: dict) -> dict:
    """gpu_host.py's modes in turn, ``rounds`` times, each in a fresh process: step time, host time per
    phase and memory per phase of shardspeed ZeRO-3 / ZeRO-0 against FSDP2 and plain autocast (one
    rank; RESULTS.md, "Stage 3 host time"). Ratios mean most within a round (these VMs drift)."""
    import subprocess

    script = os.path.join(ROOT, "benchmarks", "gpu_host.py")
    env = {**os.environ, "DEV": ctx["device"]}
    rows = []
    for r in range(3):
        for mode in ("ss3", "fsdp2", "ss0", "plain"):
            if ctx["left"]() < 45:
                rows.append({"round": r, "mode": mode, "error": "skipped: budget"})
                continue
            p = subprocess.run([sys.executable, script, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(30.0, ctx["left"]()))
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("{")), None)
            row = {"round": r, **json.loads(line)} if line else {"round": r, "mode": mode,
                                                                 "error": (p.stderr or p.stdout)[-500:]}
            rows.append(row)
            _log(f"  round {r} {mode}: {row.get('step_ms', row.get('error'))}")
    return {"rows": rows, "note": "step_ms free-running; host_*_ms: time to return per phase, no sync inside"}


def write_report(path: str, report: dict) -> None:
    lines = ["# shardspeed gpu_check", "", f"command: `{' '.join(sys.argv)}`", ""]
    for name, body in report.items():
        lines += [f"## {name}", ""]
        rows = body.get("rows") if isinstance(body, dict) else None
        if rows:
            keys = sorted({k for r in rows for k in r})
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
            lines.append("")
        lines += ["```json", json.dumps(body, indent=1, default=str), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.md", help="markdown report (a JSON block per section)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the logic, not the speed")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together")
    ap.add_argument("--sections", default="env,parity,speed,memory,host")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    start = time.perf_counter()
    ctx = {"device": device, "quick": args.quick, "worlds": [1, 2] if gpus >= 2 or device == "cpu" else [1],
           "left": lambda: args.budget - (time.perf_counter() - start)}
    sections = {"env": section_env, "parity": section_parity, "speed": section_speed, "memory": section_memory,
                "host": section_host}
    report: dict[str, Any] = {}
    for name in args.sections.split(","):
        _log(f"== {name} ({ctx['left']():.0f} s left)")
        try:
            report[name] = sections[name](ctx)
        except Exception as e:  # one broken section must not lose the others
            traceback.print_exc()
            report[name] = {"error": repr(e)[:1000]}
        write_report(args.out, report)  # after each section: a later hang still leaves the earlier ones
    _log(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    failed = [r for s in report.values() if isinstance(s, dict) for r in s.get("rows", [])
              if r.get("pass") is False or "error" in r and not str(r["error"]).startswith("skipped")]
    return 1 if failed or any("error" in s for s in report.values() if isinstance(s, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
