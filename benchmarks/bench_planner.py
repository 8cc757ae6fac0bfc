"""Issue 16's planner must-show: predicted per-rank peak against the measured one, stages 1-3, with and
without offload, on three sizes of the issue-12 MLP, with DeepSpeed's estimators on the same settings.

    .venv/bin/python benchmarks/bench_planner.py                          # in memory, 3 sizes x stages 1-3
    .venv/bin/python benchmarks/bench_planner.py --offload nvme --nvme-path /var/tmp/ss-nvme
    .venv/bin/python benchmarks/bench_planner.py --report-only --tag TAG

Measured side: ``mlp_mem_worker.py`` (2 ranks, fp32 AdamW, default settings, 3 steps, peak anonymous
RSS sampled every 5 ms over the baseline taken after a warm-up, MALLOC_MMAP_THRESHOLD_=65536), the
larger of the two ranks. Predicted side: ``shardspeed.zero.planner.make_plan`` on the same config
dict and the same model built on the meta device: model states + buffers + largest transient, device
and host together (one memory on a CPU). DeepSpeed's side: its own ``estimate_zero2/3_model_states_
mem_needs`` (DeepSpeed's venv, a subprocess), with the same world size, ``cpu_offload`` for any
offload and ``cpu_offload_params`` for parameter offload (it has no NVMe estimate), stage 3's
largest layer = one Linear, ``zero_init`` off (the model
is built whole); zero2's estimate stands for stage 1 too (DeepSpeed has no stage-1 estimator). It
assumes fp16 mixed precision, whatever the config says: that is part of what is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import launch, read_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DS_PYTHON = "/work/.venv-deepspeed/bin/python"
MiB = 2**20


def zero_extra(offload: str, nvme_path: str) -> dict:
    """The zero_optimization keys of an offload mode. ``nvme``: optimizer state (and copied masters)
    on disk in sub-groups of at most 4M elements (about one bucket or unit of the 50M model) through a
    ring of 3 buffers (read-ahead, step, write-back), so memory holds the ring, not the partition.
    ``nvme-params`` (stage 3): that, and the parameter shards on disk too (ZeRO-Infinity's setting)."""
    if offload == "none":
        return {}
    if offload == "cpu":
        return {"offload_optimizer": {"device": "cpu"}}
    extra: dict = {"offload_optimizer": {"device": "nvme", "nvme_path": nvme_path, "buffer_count": 3},
                   "sub_group_size": 4_000_000}
    if offload == "nvme-params":
        extra["offload_param"] = {"device": "nvme", "nvme_path": nvme_path}
    return extra


def predict(width: int, mode: str, zero: dict) -> dict:
    import mlp_mem_worker as worker
    import torch

    from shardspeed.zero.planner import load_plan_config, make_plan, settings_from_config, spec_from_module

    cfg, off = load_plan_config(worker.config_for(mode, zero))
    settings = settings_from_config(cfg, 2, device_type="cpu", offload=off)
    with torch.device("meta"):
        model = worker.build_model(width)
    plan = make_plan(spec_from_module(model, settings.z3), settings)
    return {"peak": plan.peak("device") + plan.peak("host"), "steady": plan.steady("device") + plan.steady("host"),
            "disk": plan.peak("disk"), "phase": plan.largest_transient()[0]}


def deepspeed_estimates(queries: list[dict]) -> list[dict | None]:
    """DeepSpeed's estimators on each query, in its own venv; None where it is not installed."""
    if not os.path.exists(DS_PYTHON):
        return [None] * len(queries)
    script = """
import json, sys, io, contextlib
with contextlib.redirect_stdout(io.StringIO()):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
out = []
for q in json.loads(sys.stdin.read()):
    if q["stage"] == 3:
        cpu, gpu, _ = z3(q["n"], q["largest"], 2, 1, cpu_offload=q["offload"],
                         cpu_offload_params=q["offload_params"], zero_init=False)
    else:
        cpu, gpu = z2(q["n"], 2, 1, cpu_offload=q["offload"])
    out.append({"cpu": cpu, "gpu": gpu})
print(json.dumps(out))
"""
    p = subprocess.run([DS_PYTHON, "-c", script], input=json.dumps(queries), capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if p.returncode != 0:
        print(f"DeepSpeed's estimators failed:\n{p.stderr[-2000:]}", file=sys.stderr)
        return [None] * len(queries)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1768,2500,3536", help="Linear widths: 25M, 50M, 100M parameters")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--offload", default="none", help="comma list of none | cpu | nvme | nvme-params")
    ap.add_argument("--nvme-path", default="/var/tmp/shardspeed-nvme")
    ap.add_argument("--tag", default="planner")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    runs = [(int(w), f"stage{s}", o) for o in args.offload.split(",") for w in args.widths.split(",")
            for s in args.stages.split(",") if o != "nvme-params" or s == "3"]  # parameter offload: stage 3 only
    if not args.report_only:
        os.makedirs(args.nvme_path, exist_ok=True)
        for width, mode, off in runs:
            zero = zero_extra(off, args.nvme_path)
            print(f"== {mode} width {width} offload {off}", flush=True)
            launch(2, os.path.join(HERE, "mlp_mem_worker.py"), "--mode", mode, "--tag", args.tag, "--width",
                   str(width), "--zero", json.dumps(zero), env=ENV, results="mlp_memory")
    report(runs, args.tag, args.nvme_path)


def report(runs: list[tuple[int, str, str]], tag: str, nvme_path: str) -> None:
    rows = {(r["width"], r["mode"], json.dumps(r.get("zero", {}), sort_keys=True)): r
            for r in read_results("mlp_memory") if r["tag"] == tag}
    found, queries = [], []
    for width, mode, off in runs:
        zero = zero_extra(off, nvme_path)
        r = rows.get((width, mode, json.dumps(zero, sort_keys=True)))
        if r is None:
            print(f"(no measurement for {mode} width {width} offload {off} under tag {tag})")
            continue
        found.append((width, mode, off, zero, r))
        queries.append({"stage": int(mode[-1]), "n": r["n_params"], "largest": width * width + width,
                        "offload": off != "none", "offload_params": off == "nvme-params"})
    ds = deepspeed_estimates(queries)
    print("| model | stage | offload | measured peak MiB (B/param) | predicted peak MiB (B/param) | predicted / "
          "measured | measured steady B/param | predicted steady B/param | disk MiB predicted / measured | "
          "DeepSpeed per GPU B/param | DeepSpeed GPU + CPU/rank B/param |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (width, mode, off, zero, r), est in zip(found, ds, strict=True):
        n = r["n_params"]
        pred = predict(width, mode, zero)
        peak = max(x["peak"] - x["baseline"] for x in r["per_rank"])
        steady = max(x["steady"] - x["baseline"] for x in r["per_rank"])
        disk = max(x["counted"].get("optimizer_states_on_disk", 0) + x["counted"].get("parameters_on_disk", 0)
                   for x in r["per_rank"])
        ds_gpu = f"{est['gpu'] / n:.2f}" if est else "n/a"
        ds_sum = f"{(est['gpu'] + est['cpu'] / 2) / n:.2f}" if est else "n/a"
        disk_s = f"{pred['disk'] / MiB:.0f} / {disk / MiB:.0f}" if pred["disk"] or disk else "-"
        print(f"| {n / 1e6:.1f}M | {mode[-1]} | {off} | {peak / MiB:.0f} ({peak / n:.2f}) | "
              f"{pred['peak'] / MiB:.0f} ({pred['peak'] / n:.2f}) | {pred['peak'] / peak:.3f} | {steady / n:.2f} | "
              f"{pred['steady'] / n:.2f} | {disk_s} | {ds_gpu} | {ds_sum} |")


if __name__ == "__main__":
    main()
