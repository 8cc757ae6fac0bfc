"""``shardspeed-plan``: per-rank device, host and disk bytes of a config on a model, and whether they
fit this machine.

    shardspeed-plan --config ds.json --params 1.3B --ranks 2
    shardspeed-plan --config ds.json --model mypkg.models:build_gpt --ranks 8 --nodes 2 --device cuda

Exit status: 0 it fits, 1 it does not, 2 the command or the config is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from shardspeed.config import ConfigError
from shardspeed.zero.planner.items import TIERS
from shardspeed.zero.planner.plan import Plan, make_plan
from shardspeed.zero.planner.settings import load_plan_config, settings_from_config
from shardspeed.zero.planner.spec import ModelSpec, load_factory, spec_from_count, spec_from_module

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """``50000000``, ``5e7``, ``350M``, ``1.3B`` -> an element count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (e.g. 50000000, 5e7, 350M, 1.3B)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 1 or value != math.floor(value):
        raise argparse.ArgumentTypeError(f"{text!r}: a parameter count is a positive whole number")
    return int(value)


def human(n: int) -> str:
    if n == 0:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardspeed-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit status: 0 fits, 1 does not fit, 2 bad command or config")
    ap.add_argument("--config", required=True, help="the DeepSpeed-style JSON config the run will use")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=parse_count, help="parameter count (e.g. 1.3B); the layout is assumed")
    what.add_argument("--model", metavar="MODULE:FACTORY", help="a function building the model (run on the meta "
                                                                "device: nothing is allocated)")
    ap.add_argument("--largest-layer", type=parse_count, help="with --params: parameters of the largest layer "
                                                              "(default: params / 8)")
    ap.add_argument("--ranks", "--num_gpus", "--num_procs", type=int, default=1, dest="ranks",
                    help="data-parallel ranks in all (default 1)")
    ap.add_argument("--nodes", "--num_nodes", type=int, default=1, dest="nodes", help="machines (default 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the model computes (default: this machine's accelerator)")
    ap.add_argument("--zero-init", action="store_true", help="the model is built under shardspeed.zero.Init")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def build_plan(args: argparse.Namespace) -> tuple[Plan, str]:
    if args.ranks < 1 or args.nodes < 1 or args.ranks % args.nodes:
        raise ValueError(f"--ranks {args.ranks} over --nodes {args.nodes}: both must be positive and the ranks "
                         "split evenly over the nodes")
    if args.largest_layer is not None and args.params is None:
        raise ValueError("--largest-layer goes with --params (a --model gives its own layout)")
    device = args.device
    if device is None:
        from shardspeed.accelerator import get_accelerator

        device = get_accelerator().name
    cfg, offload = load_plan_config(args.config)
    settings = settings_from_config(cfg, args.ranks, device_type=device, zero_init=args.zero_init, offload=offload)
    spec: ModelSpec
    if args.model is not None:
        spec = spec_from_module(load_factory(args.model), settings.z3)
        source = f"model {args.model}"
    else:
        spec = spec_from_count(args.params, args.largest_layer)
        source = f"--params {args.params:,}"
    return make_plan(spec, settings), source


@dataclass(frozen=True)
class Fit:
    lines: list[str]
    fits: bool


def check_fit(plan: Plan, ranks_per_node: int, offload_paths: list[str]) -> Fit:
    """Whether ``ranks_per_node`` ranks of ``plan`` fit this machine's memory and ``nvme_path``'s disk."""
    peak = plan.peak_bytes_per_rank()
    lines, ok = [], True
    avail = psutil.virtual_memory().available
    if plan.settings.device_type == "cpu":
        need = ranks_per_node * (peak["device"] + peak["host"])
        fits = need <= avail
        lines.append(f"memory (device = host: the CPU): {ranks_per_node} rank(s) x {human(need // ranks_per_node)} = "
                     f"{human(need)} needed, {human(avail)} available: {'fits' if fits else 'DOES NOT FIT'}")
        ok &= fits
    else:
        need = ranks_per_node * peak["host"]
        fits = need <= avail
        lines.append(f"host memory: {ranks_per_node} rank(s) x {human(peak['host'])} = {human(need)} needed, "
                     f"{human(avail)} available: {'fits' if fits else 'DOES NOT FIT'}")
        ok &= fits
        free = _device_free()
        if free is None:
            lines.append(f"device memory: {human(peak['device'])} per rank needed; no CUDA device here to check")
        else:
            fits = peak["device"] <= free
            lines.append(f"device memory: {human(peak['device'])} per rank needed, {human(free)} free on this "
                         f"device: {'fits' if fits else 'DOES NOT FIT'}")
            ok &= fits
    if peak["disk"]:
        need = ranks_per_node * peak["disk"]
        for path in sorted(set(offload_paths)) or ["."]:
            where = Path(path)
            if not where.is_dir():
                lines.append(f"disk at nvme_path '{path}': it does not exist (create the directory on a local disk "
                             f"with {human(need)} free)")
                ok = False
                continue
            free = shutil.disk_usage(where).free
            fits = need <= free
            lines.append(f"disk at nvme_path '{path}': {ranks_per_node} rank(s) x {human(peak['disk'])} = "
                         f"{human(need)} needed, {human(free)} free: {'fits' if fits else 'DOES NOT FIT'}")
            ok &= fits
    return Fit(lines, ok)


def _device_free() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def render(plan: Plan, source: str) -> str:
    s, spec = plan.settings, plan.spec
    out = [f"shardspeed-plan: ZeRO stage {s.stage}, {s.world} rank(s), {s.compute} compute, {s.optimizer.name}; "
           f"{source}: {spec.total:,} parameters ({spec.trainable:,} trainable), largest tensor "
           f"{spec.largest_param:,}", ""]
    width = max([len(i.what) for i in plan.items] + [40]) + 2
    out.append("per rank".ljust(width) + "".join(t.rjust(12) for t in TIERS))

    def row(label: str, values: dict[str, int], indent: str = "  ") -> str:
        return (indent + label).ljust(width) + "".join(human(values[t]).rjust(12) for t in TIERS)

    def section(title: str, group: str, phase: str | None = None) -> None:
        chosen = [i for i in plan.items if i.group == group and (phase is None or i.phase == phase)]
        out.append(title)
        if not chosen:
            out.append("  none")
            return
        for i in chosen:
            out.append(row(i.what, {t: i.nbytes if i.tier == t else 0 for t in TIERS}))
        out.append(row("total", {t: sum(i.nbytes for i in chosen if i.tier == t) for t in TIERS}))

    section("model states", "model states")
    section("buffers", "buffers")
    phase, _ = plan.largest_transient()
    section(f"largest transient ({phase or 'none'})", "transient", phase)
    out.append(row("peak of a step (model states + buffers + largest transient)",
                   {t: plan.peak(t) for t in TIERS}, indent=""))
    if any(i.group == "init" for i in plan.items):
        section("initialize()", "init")
    for name, tiers in plan.phases().items():
        if name != phase:
            out.append(f"(other transients: {name} {human(tiers['device'] + tiers['host'])} in memory)")
    if plan.notes:
        out.append("notes:")
        out += [f"  - {n}" for n in plan.notes]
    out.append("not counted: activations, the data loader, the Python/torch runtime (~70 MiB per process on CPU)")
    return "\n".join(out)


def to_json(plan: Plan, fit: Fit) -> dict[str, Any]:
    phase, _ = plan.largest_transient()
    return {"stage": plan.settings.stage, "ranks": plan.settings.world, "params": plan.spec.total,
            "items": [i.__dict__ for i in plan.items], "largest_transient_phase": phase,
            "peak": {t: plan.peak(t) for t in TIERS}, "init_peak": {t: plan.init_peak(t) for t in TIERS},
            "notes": plan.notes, "fit": fit.lines, "fits": fit.fits}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        plan, source = build_plan(args)
    except (ConfigError, ValueError) as e:
        print(f"shardspeed-plan: {e}", file=sys.stderr)
        return 2
    s = plan.settings
    paths = [o.nvme_path for o in (s.offload_optimizer, s.offload_param) if o is not None and o.device == "nvme"
             and o.nvme_path]
    fit = check_fit(plan, args.ranks // args.nodes, paths)
    if args.json:
        print(json.dumps(to_json(plan, fit), indent=1))
    else:
        print(render(plan, source))
        print("this machine:")
        print("\n".join(f"  {line}" for line in fit.lines))
    return 0 if fit.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
