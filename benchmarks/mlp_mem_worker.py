"""One rank of bench_mlp_memory.py: RSS (steady and sampled peak, over the process baseline) and
counted bytes for the issue-12 MLP, under shardspeed ZeRO (default settings), torch DDP or FSDP2.
Started through the launcher."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import append_result  # noqa: E402

WIDTH, LAYERS, BATCH, STEPS = 2500, 8, 8, 3


def rss() -> int:
    """Anonymous resident bytes: RSS less its file-backed pages. The first fused AdamW step alone
    pages in ~70 MiB of libtorch's code (measured: RSS 274 -> 344 MiB on a 10k-parameter model);
    those pages are shared by every rank and hold no tensor, so per-parameter figures leave them out
    (total RSS is recorded beside, as ``steady_total``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def total_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Highest RSS seen, sampled every ``period`` seconds in a background thread (torch ops release
    the GIL, so the thread keeps sampling while a kernel or a collective runs)."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak = period, rss()
        self.phase, self.by_phase = "", {}  # the peak seen while each phase label was set
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now, phase = rss(), self.phase
            self.peak = max(self.peak, now)
            self.by_phase[phase] = max(self.by_phase.get(phase, 0), now)

    def set_phase(self, phase: str) -> None:
        now = rss()
        self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), now)
        self.phase = phase

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def warm_up() -> None:
    """Pay the process's one-time costs before the baseline is read, on a 10k-parameter model:
    the first fused and foreach AdamW steps alone raise anonymous RSS by ~66 MiB (measured; it does
    not grow with the model, so on 50M parameters it would read as 1.3 B/param). Reported as
    ``fixed``, per rank, beside the per-parameter figures."""
    import torch.distributed as dist

    for fused in (True, False):
        m = torch.nn.Linear(100, 100)
        m(torch.randn(4, 100)).sum().backward()
        opt = torch.optim.AdamW(m.parameters(), fused=fused, foreach=None if fused else True)
        opt.step()
    dist.all_reduce(torch.ones(1000))
    del m, opt


def build_model(width: int) -> torch.nn.Module:
    torch.manual_seed(1234)
    layers: list[torch.nn.Module] = []
    for i in range(LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i < LAYERS - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def data(step: int, rank: int, micro: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, width, generator=g), torch.randn(BATCH, width, generator=g)
    return x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]


def nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):  # FSDP2's DTensor: this rank's shard
        t = t.to_local()
    return t.numel() * t.element_size()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, help="stage0 | stage1 | stage2 | stage3 | ddp | fsdp2")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--width", type=int, default=WIDTH, help="a small width measures the fixed overhead")
    ap.add_argument("--zero", default="{}", help="JSON merged into zero_optimization (bench_planner.py: offload)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode.startswith("stage"):
        import shardspeed

        shardspeed.init_distributed()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cold = rss()
    warm_up()
    baseline, baseline_total = rss(), total_rss()
    with PeakSampler() as build_peak:
        model = build_model(args.width)
        n = sum(p.numel() for p in model.parameters())
        step_fn, counted = _setup(args.mode, model, world, json.loads(args.zero))
    after_init = rss()
    micro = BATCH // world
    with PeakSampler() as step_peak:
        for step in range(STEPS):
            step_fn(*data(step, rank, micro, args.width), step_peak.set_phase)
        step_peak.set_phase("")
    steady, steady_total = rss(), total_rss()
    row = {"rank": rank, "baseline": baseline, "after_init": after_init, "init_peak": build_peak.peak,
           "fixed": baseline - cold, "steady": steady, "peak": step_peak.peak,
           "baseline_total": baseline_total, "steady_total": steady_total,
           "peak_by_phase": {k: v for k, v in step_peak.by_phase.items() if k}, "counted": counted()}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        append_result("mlp_memory", {"mode": args.mode, "n_params": n, "width": args.width, "world": world,
                                     "steps": STEPS, "tag": args.tag, "zero": json.loads(args.zero),
                                     "per_rank": rows})
    dist.barrier()


def config_for(mode: str, zero: dict | None = None) -> dict:
    """The engine's config for ``stage<N>`` (default settings) with ``zero`` merged into its
    zero_optimization section; bench_planner.py plans the same dict."""
    return {"train_batch_size": BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "zero_optimization": {"stage": int(mode[-1]), **(zero or {})}}


def _setup(mode: str, model: torch.nn.Module, world: int, zero: dict | None = None):
    """(step function on one micro-batch, counted-bytes function) for ``mode``."""
    if mode.startswith("stage"):
        import shardspeed

        config = config_for(mode, zero)
        engine, *_ = shardspeed.initialize(model=model, config=config)
        at_peak: dict[str, int] = {}
        strategy = engine.strategy
        if hasattr(strategy, "_held"):  # stage 3: record what made up its transient high-water mark
            note = strategy._note_peak

            def note_peak() -> None:
                if strategy._transient_bytes() > strategy._peak_transient:
                    at_peak.clear()
                    at_peak.update({f"peak_{k}": v for k, v in strategy._held.items()})
                note()

            strategy._note_peak = note_peak

        def step(x: torch.Tensor, y: torch.Tensor, phase) -> None:
            phase("forward")
            loss = torch.nn.functional.mse_loss(engine(x), y)
            phase("backward")
            engine.backward(loss)
            phase("step")
            engine.step()

        return step, lambda: {**engine.memory_breakdown(), **at_peak}

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
    else:
        raise SystemExit(f"unknown --mode {mode!r}")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)

    def step(x: torch.Tensor, y: torch.Tensor, phase) -> None:
        phase("forward")
        loss = torch.nn.functional.mse_loss(module(x), y)
        phase("backward")
        loss.backward()
        phase("step")
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradients, as the engine keeps its gradient buffers

    def counted() -> dict[str, int]:
        ps = list(module.parameters())
        out = {"parameters": sum(nbytes(p) for p in ps),
               "gradients": sum(nbytes(p.grad) for p in ps if p.grad is not None),
               "master_parameters": 0,
               "optimizer_states": sum(nbytes(v) for st in opt.state.values() for v in st.values()
                                       if torch.is_tensor(v) and v.dim() > 0)}
        if mode == "ddp":  # DDP's reducer buckets (gradient_as_bucket_view=False keeps a second copy)
            out["temporary_buffers"] = out["gradients"]
        return out

    return step, counted


if __name__ == "__main__":
    main()
