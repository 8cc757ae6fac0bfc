"""Pipeline parallelism (issue 14): shardspeed's pipeline engine against DeepSpeed's PipelineEngine and
PyTorch's ``torch.distributed.pipelining`` (``Schedule1F1B``), on the same GPT layers
(``examples/pipeline_gpt/layers.py``), the same partition, data and AdamW, at P = 2 and 4 stages on
P local ranks (1 thread each), m = 4, 8, 16 micro-batches per step, in one command:

    .venv/bin/python benchmarks/bench_pipe.py [--reps 2] [--ds-venv ../.venv-deepspeed] [-- --hidden 256 ...]

Per run: step time (pipe_worker.py, Note: what a step time holds), the ideal step time from each
stage's measured forward+backward time (Note: the ideal step time), ratios to the ideal and to the
peers, and the loss at step 1 and at the last step, which must agree across the three libraries.
A fourth run, shardspeed with ``"pipeline": {"early_grads": false}``, takes its turns beside them to
show what the early gradient sends of the 1F1B cool-down change (schedule.py, Note: early gradient sends).
The head is untied here (``tied=False``): ``torch.distributed.pipelining`` has no way to keep a weight
shared by two stages equal.

The machine is shared and its load swings within minutes (load average 2 to 13 was seen while this
was written), so by default the three libraries take turns inside one launch per (P, repetition):
every rank runs all three from DeepSpeed's venv (same torch 2.13.0+cpu wheel; shardspeed imported
from this tree), rounds of a few steps each in a rotating order, with the stage timing for the ideal
as a fourth turn (pipe_worker.py, ``interleaved``). ``--separate`` launches each library alone in its
own venv instead, alternating launches. Odd repetitions reverse the order of libraries and of m.
Rows: benchmarks/out/pipe.jsonl; summary: out/pipe_summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import OUT, ROOT, median, read_results  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipe_worker.py")
LIBS = ["shardspeed", "shardspeed_whole", "deepspeed", "torch"]
NAMES = {"shardspeed": "shardspeed PipelineEngine", "deepspeed": "DeepSpeed PipelineEngine",
         "shardspeed_whole": "shardspeed, early_grads off",  # schedule.py, Note: early gradient sends
         "torch": "torch.distributed.pipelining Schedule1F1B"}
PEERS = ("shardspeed_whole", "deepspeed", "torch")  # the paired-ratio columns


def launch(libs: list[str], p: int, ms: list[int], rep: int, tag: str, ds_venv: str, extra: list[str]) -> str | None:
    """One worker launch on p ranks (several libraries: interleaved in it); None when it wrote its
    rows, else why not."""
    python = os.path.join(ds_venv, "bin", "python") if "deepspeed" in libs else sys.executable
    if not os.path.exists(python):
        return f"no python at {python}"
    before = len(read_results("pipe"))
    cmd = [python, "-m", "shardspeed.launcher", "--num_procs", str(p), "--no_local_rank", WORKER, "--lib",
           ",".join(libs), "--ms", ",".join(map(str, ms)), "--rep", str(rep), "--tag", tag, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=1800, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return "timed out after 1800 s"
    for line in proc.stdout.splitlines():
        if "s/step" in line or "Error" in line:
            print("   ", line, flush=True)
    # torch 2.13's gloo can abort a rank at interpreter exit after a complete run: the rows decide
    if len(read_results("pipe")) - before >= len(ms) * len(libs):
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


def _paired(a: list[dict], b: list[dict]) -> float | None:
    """Median over the turns of (a's s/step / b's s/step), turn by turn of the same launch: the two ran
    seconds apart, so load from outside cancels. Without turns (``--separate``): the ratio of the
    median step times; None when either has no rows."""
    ratios = _turn_ratios(a, b)
    if ratios:
        return median(ratios)
    return median([r["step_s"] for r in a]) / median([r["step_s"] for r in b]) if a and b else None


# Student's t, 97.5 % quantile, by degrees of freedom (two-sided 95 %); 1.96 beyond the table
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
         15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def _turn_ratios(a: list[dict], b: list[dict]) -> list[float]:
    """a's s/step over b's, turn by turn of the same launches (interleaved runs only)."""
    ratios = []
    for ra in a:
        rb = next((r for r in b if r["rep"] == ra["rep"] and "round_step_s" in r), None)
        if rb is not None and "round_step_s" in ra:
            ratios += [x / y for x, y in zip(ra["round_step_s"], rb["round_step_s"], strict=True)]
    return ratios


def paired_interval(a: list[dict], b: list[dict]) -> tuple[float, float, float, int] | None:
    """(geometric mean, low, high, turns) of the turn-by-turn ratio a/b, with a 95 % confidence interval
    from Student's t over the log ratios; None with fewer than 3 turns. The turns of one launch are
    seconds apart and in a rotated order, so they are treated as independent pairs; what the interval
    does not cover is a difference between launches (the reps)."""
    logs = [math.log(r) for r in _turn_ratios(a, b)]
    n = len(logs)
    if n < 3:
        return None
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    t = next((v for df, v in sorted(_T975.items()) if df >= n - 1), 1.96)
    half = t * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), n


def summarize(tag: str, pending: dict[str, str]) -> tuple[str, dict]:
    rows = [r for r in read_results("pipe") if r["tag"] == tag]
    out: dict = {"tag": tag, "configs": []}
    lines = ["| P | m | bubble | run | s/step, loop (per rep) | s/step, median turn | ideal s | median turn / ideal | "
             "ideal, slowest stage s | vs early_grads off, paired | vs DeepSpeed, paired | vs torch 1F1B, paired | "
             "loss @1 | loss @last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, m in sorted({(r["p"], r["m"]) for r in rows}):
        mine = [r for r in rows if r["p"] == p and r["m"] == m]
        ideals = [ideal(r) for r in mine]
        ideal_s, slow_s = median([i[0] for i in ideals]), median([i[1] for i in ideals])
        by_lib = {lib: sorted((r for r in mine if r["lib"] == lib), key=lambda r: r["rep"]) for lib in LIBS}
        by_lib = {lib: rs for lib, rs in by_lib.items() if rs}
        steps = {lib: median([r["step_s"] for r in rs]) for lib, rs in by_lib.items()}
        turns = {lib: median([t for r in rs for t in r.get("round_step_s", [r["step_s"]])])
                 for lib, rs in by_lib.items()}
        losses = {lib: rs[0]["losses"] for lib, rs in by_lib.items()}
        spread = max(abs(a - b) for la in losses.values() for lb in losses.values()
                     for a, b in zip(la, lb, strict=True))
        parts = sorted({tuple(r["parts"]) for r in mine})
        paired = {lib: {peer: _paired(by_lib[lib], by_lib[peer]) for peer in PEERS if peer in by_lib}
                  for lib in by_lib}
        intervals = {peer: paired_interval(by_lib["shardspeed"], by_lib[peer]) for peer in PEERS
                     if "shardspeed" in by_lib and peer in by_lib}
        cfg = {"p": p, "m": m, "bubble": (p - 1) / (m + p - 1), "ideal_s": ideal_s, "ideal_slowest_s": slow_s,
               "step_s": steps, "median_turn_s": turns, "paired_ratio": paired, "losses": losses,
               "max_loss_diff": spread, "parts": [list(x) for x in parts], "shardspeed_vs_peer_ci95": intervals,
               "load_avg": [r.get("load_avg") for r in mine],
               "stage_fb_s": [median([r["stages"][s]["fb_s"] for r in mine]) for s in range(p)],
               "stage_opt_s": [median([r["stages"][s]["opt_s"] for r in mine]) for s in range(p)]}
        out["configs"].append(cfg)
        for lib in LIBS:
            if lib not in steps:
                why = pending.get(lib, "no rows")
                lines.append(f"| {p} | {m} | {cfg['bubble']:.3f} | {NAMES[lib]} | not yet ({why}) | | | | | | | | | |")
                continue
            reps = " / ".join(f"{r['step_s']:.3f}" for r in by_lib[lib])
            vs = {peer: (f"{v:.3f}" if (v := paired[lib].get(peer)) is not None else "-") for peer in PEERS}
            lines.append(f"| {p} | {m} | {cfg['bubble']:.3f} | {NAMES[lib]} | {steps[lib]:.3f} ({reps}) | "
                         f"{turns[lib]:.3f} | {ideal_s:.3f} | {turns[lib] / ideal_s:.3f} | {slow_s:.3f} | "
                         f"{vs['shardspeed_whole']} | {vs['deepspeed']} | {vs['torch']} | {losses[lib][0]:.6f} | "
                         f"{losses[lib][-1]:.6f} |")
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
    ap.add_argument("--separate", dest="interleave", action="store_false",
                    help="one launch per library (each in its own venv) instead of all three taking turns in "
                         "one launch from DeepSpeed's venv")
    ap.add_argument("worker_args", nargs=argparse.REMAINDER, help="passed to pipe_worker.py after '--'")
    args = ap.parse_args()
    extra = [a for a in args.worker_args if a != "--"]
    libs = [lib for lib in LIBS if not args.only or lib in args.only.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    pending: dict[str, str] = {}
    if not args.summarize_only:
        for rep in range(args.reps):
            for p in [int(v) for v in args.ps.split(",")]:
                order = libs if rep % 2 == 0 else libs[::-1]
                rep_ms = ms if rep % 2 == 0 else ms[::-1]
                groups = [order] if args.interleave else [[lib] for lib in order]
                for group in groups:
                    group = [lib for lib in group if lib not in pending]
                    if not group:
                        continue
                    print(f"rep {rep}: P={p}: {', '.join(NAMES[lib] for lib in group)}", flush=True)
                    why = launch(group, p, rep_ms, rep, args.tag, args.ds_venv, extra)
                    if why and "shardspeed" in group:
                        # the engine not usable (yet)? say so in the table and measure the peers without it
                        print(f"    P={p} {group} failed: {why}; again without shardspeed", flush=True)
                        pending["shardspeed"] = why[:200]
                        group = [lib for lib in group if lib != "shardspeed"]
                        why = launch(group, p, rep_ms, rep, args.tag, args.ds_venv, extra) if group else None
                    if why:
                        raise SystemExit(f"P={p} {group} failed: {why}")
    table, out = summarize(args.tag, pending)
    out["pending"] = pending
    with open(os.path.join(OUT, "pipe_summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(table)
    for cfg in out["configs"]:
        print(f"P={cfg['p']} m={cfg['m']}: partition {cfg['parts']}, stage fwd+bwd s "
              f"{[round(v, 4) for v in cfg['stage_fb_s']]}, optimizer s {[round(v, 4) for v in cfg['stage_opt_s']]}, "
              f"losses agree to {cfg['max_loss_diff']:.2e}")
        for peer, ci in cfg["shardspeed_vs_peer_ci95"].items():
            if ci is not None:
                print(f"    shardspeed / {NAMES[peer]}, turn by turn: geometric mean {ci[0]:.3f}, 95% CI "
                      f"{ci[1]:.3f}-{ci[2]:.3f} ({ci[3]} turns)")
    print(f"raw: {os.path.join(OUT, 'pipe.jsonl')}, summary: {os.path.join(OUT, 'pipe_summary.json')}")


if __name__ == "__main__":
    main()
