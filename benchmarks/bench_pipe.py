"""Pipeline parallelism (issue 14): shardspeed's pipeline engine against DeepSpeed's PipelineEngine and
PyTorch's ``torch.distributed.pipelining`` (``Schedule1F1B``), on the same GPT layers
(``examples/pipeline_gpt/layers.py``), the same partition, data and AdamW, at P = 2 and 4 stages on
P local ranks (1 thread each), m = 4, 8, 16 micro-batches per step, in one command:

    .venv/bin/python benchmarks/bench_pipe.py [--reps 2] [--ds-venv ../.venv-deepspeed] [-- --hidden 256 ...]

Per run: step time (pipe_worker.py, Note: what a step time holds), the ideal step time from each
stage's measured forward+backward time (Note: the ideal step time), ratios to the ideal and to the
peers, and the loss at step 1 and at the last step, which must agree across the three libraries.
The head is untied here (``tied=False``): ``torch.distributed.pipelining`` has no way to keep a weight
shared by two stages equal. Launches alternate between the libraries, in reverse order (and m in
reverse order) on odd repetitions. Rows: benchmarks/out/pipe.jsonl; summary: out/pipe_summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipe_worker.py")
LIBS = ["shardspeed", "deepspeed", "torch"]
NAMES = {"shardspeed": "shardspeed PipelineEngine", "deepspeed": "DeepSpeed PipelineEngine",
         "torch": "torch.distributed.pipelining Schedule1F1B"}


def launch(lib: str, p: int, ms: list[int], rep: int, tag: str, ds_venv: str, extra: list[str]) -> str | None:
    """One worker launch on p ranks; None when it wrote its rows, else why not."""
    python = os.path.join(ds_venv, "bin", "python") if lib == "deepspeed" else sys.executable
    if not os.path.exists(python):
        return f"no python at {python}"
    before = len(read_results("pipe"))
    cmd = [python, "-m", "shardspeed.launcher", "--num_procs", str(p), "--no_local_rank", WORKER, "--lib", lib,
           "--ms", ",".join(map(str, ms)), "--rep", str(rep), "--tag", tag, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=900, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return "timed out after 900 s"
    for line in proc.stdout.splitlines():
        if "s/step" in line or "Error" in line:
            print("   ", line, flush=True)
    # torch 2.13's gloo can abort a rank at interpreter exit after a complete run: the rows decide
    if len(read_results("pipe")) - before >= len(ms):
        return None
    tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-3:]
    return f"exit {proc.returncode}: " + " | ".join(tail)


def ideal(row: dict) -> tuple[float, float]:
    """(ideal, ideal with the slowest stage) for the row's m and p (pipe_worker.py, Note: the ideal)."""
    p, m = row["p"], row["m"]
    fb = [s["fb_s"] for s in row["stages"]]
    opt = max(s["opt_s"] for s in row["stages"])
    bubble = (p - 1) / (m + p - 1)
    return m * sum(fb) / p / (1 - bubble) + opt, (m + p - 1) * max(fb) + opt


def summarize(tag: str, pending: dict[str, str]) -> tuple[str, dict]:
    rows = [r for r in read_results("pipe") if r["tag"] == tag]
    out: dict = {"tag": tag, "configs": []}
    lines = ["| P | m | bubble | run | step s (per rep) | ideal s | step / ideal | ideal, slowest stage s | "
             "step / slowest-stage ideal | vs DeepSpeed | vs torch 1F1B | loss @1 | loss @last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, m in sorted({(r["p"], r["m"]) for r in rows}):
        mine = [r for r in rows if r["p"] == p and r["m"] == m]
        ideals = [ideal(r) for r in mine]
        ideal_s, slow_s = median([i[0] for i in ideals]), median([i[1] for i in ideals])
        steps = {lib: median([r["step_s"] for r in mine if r["lib"] == lib]) for lib in LIBS
                 if any(r["lib"] == lib for r in mine)}
        losses = {lib: next(r["losses"] for r in mine if r["lib"] == lib) for lib in steps}
        spread = max(abs(a - b) for la in losses.values() for lb in losses.values()
                     for a, b in zip(la, lb, strict=True))
        parts = sorted({tuple(r["parts"]) for r in mine})
        cfg = {"p": p, "m": m, "bubble": (p - 1) / (m + p - 1), "ideal_s": ideal_s, "ideal_slowest_s": slow_s,
               "step_s": steps, "losses": losses, "max_loss_diff": spread, "parts": [list(x) for x in parts],
               "stage_fb_s": [median([r["stages"][s]["fb_s"] for r in mine]) for s in range(p)],
               "stage_opt_s": [median([r["stages"][s]["opt_s"] for r in mine]) for s in range(p)]}
        out["configs"].append(cfg)
        for lib in LIBS:
            if lib not in steps:
                why = pending.get(lib, "no rows")
                lines.append(f"| {p} | {m} | {cfg['bubble']:.3f} | {NAMES[lib]} | not yet ({why}) | | | | | | | | |")
                continue
            reps = " / ".join(f"{r['step_s']:.3f}" for r in sorted(mine, key=lambda r: r["rep"]) if r["lib"] == lib)
            vs = {peer: (f"{steps[lib] / steps[peer]:.3f}" if peer in steps else "-")
                  for peer in ("deepspeed", "torch")}
            lines.append(f"| {p} | {m} | {cfg['bubble']:.3f} | {NAMES[lib]} | {steps[lib]:.3f} ({reps}) | "
                         f"{ideal_s:.3f} | {steps[lib] / ideal_s:.3f} | {slow_s:.3f} | {steps[lib] / slow_s:.3f} | "
                         f"{vs['deepspeed']} | {vs['torch']} | {losses[lib][0]:.6f} | {losses[lib][-1]:.6f} |")
    return "\n".join(lines), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--ps", default="2,4")
    ap.add_argument("--ms", default="4,8,16")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(LIBS))
    ap.add_argument("--ds-venv", default=os.path.join(ROOT, "..", ".venv-deepspeed"))
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("worker_args", nargs=argparse.REMAINDER, help="passed to pipe_worker.py after '--'")
    args = ap.parse_args()
    extra = [a for a in args.worker_args if a != "--"]
    libs = [lib for lib in LIBS if not args.only or lib in args.only.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    pending: dict[str, str] = {}
    if not args.summarize_only:
        for rep in range(args.reps):
            for p in [int(v) for v in args.ps.split(",")]:
                for lib in (libs if rep % 2 == 0 else libs[::-1]):
                    if lib in pending:
                        continue
                    print(f"rep {rep}: {NAMES[lib]} P={p}", flush=True)
                    why = launch(lib, p, ms if rep % 2 == 0 else ms[::-1], rep, args.tag, args.ds_venv, extra)
                    if why:
                        print(f"    {lib} P={p} failed: {why}", flush=True)
                        if lib == "shardspeed":  # the engine not usable (yet): say so in the table
                            pending[lib] = why[:200]
    table, out = summarize(args.tag, pending)
    out["pending"] = pending
    with open(os.path.join(OUT, "pipe_summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(table)
    for cfg in out["configs"]:
        print(f"P={cfg['p']} m={cfg['m']}: partition {cfg['parts']}, stage fwd+bwd s "
              f"{[round(v, 4) for v in cfg['stage_fb_s']]}, optimizer s {[round(v, 4) for v in cfg['stage_opt_s']]}, "
              f"losses agree to {cfg['max_loss_diff']:.2e}")
    print(f"raw: {os.path.join(OUT, 'pipe.jsonl')}, summary: {os.path.join(OUT, 'pipe_summary.json')}")


if __name__ == "__main__":
    main()
