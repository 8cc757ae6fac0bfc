"""FLOPs profiler: parameters, MACs, FLOPs and forward latency of every module of a model.

Counting happens at the aten level (a ``TorchDispatchMode``), so it sees what actually runs,
whatever Python code called it (``F.linear``, ``x @ w``, fused attention); ``counting.py`` says
what each op costs. A stack of the modules currently in ``forward`` (forward pre/post hooks)
attributes every op to each enclosing module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardspeed.accelerator import get_accelerator
from shardspeed.profiling.counting import count


@dataclass
class ModuleStats:
    name: str
    kind: str
    depth: int
    params: int
    macs: int = 0
    flops: int = 0
    latency: float = 0.0
    children: list[str] = field(default_factory=list)


class _Counter(TorchDispatchMode):
    def __init__(self, profiler: FlopsProfiler):
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        macs, flops = count(func, args, out)
        if macs or flops:
            for name in self.profiler._stack:
                s = self.profiler.stats[name]
                s.macs += macs
                s.flops += flops
        return out


class FlopsProfiler:
    """``start_profile()``, run forward passes, ``stop_profile()``; totals and the per-module tree
    cover every forward in between. ``end_profile()`` removes the hooks."""

    def __init__(self, model: torch.nn.Module, ignore_modules: tuple[type, ...] | None = None):
        self.model = model
        self.ignore = tuple(ignore_modules or ())
        self.stats: dict[str, ModuleStats] = {}
        self._stack: list[str] = []
        self._start: dict[str, float] = {}
        self._hooks: list[Any] = []
        self._mode: _Counter | None = None
        self._began = 0.0
        self.duration = 0.0

    def start_profile(self, ignore_list: Any = None) -> None:
        self.reset_profile()
        for name, m in self.model.named_modules():
            if isinstance(m, self.ignore):
                continue
            key = name or "(model)"
            depth = 0 if not name else name.count(".") + 1
            self.stats[key] = ModuleStats(key, type(m).__name__, depth, param_count(m))
            if name:
                parent = name.rsplit(".", 1)[0] if "." in name else "(model)"
                if parent in self.stats:
                    self.stats[parent].children.append(key)
            self._hooks.append(m.register_forward_pre_hook(self._pre(key)))
            self._hooks.append(m.register_forward_hook(self._post(key)))
        self._mode = _Counter(self)
        self._mode.__enter__()
        self._began = time.perf_counter()

    def stop_profile(self) -> None:
        if self._mode is not None:
            get_accelerator().synchronize()
            self.duration = time.perf_counter() - self._began
            self._mode.__exit__(None, None, None)
            self._mode = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    end_profile = stop_profile

    def reset_profile(self) -> None:
        self.stop_profile()
        self.stats.clear()
        self._stack.clear()

    def _pre(self, key: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            self._stack.append(key)
            get_accelerator().synchronize()
            self._start[key] = time.perf_counter()
        return hook

    def _post(self, key: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            get_accelerator().synchronize()
            self.stats[key].latency += time.perf_counter() - self._start.pop(key)
            if self._stack and self._stack[-1] == key:
                self._stack.pop()
        return hook

    # -- totals -----------------------------------------------------------------------------------
    def _root(self) -> ModuleStats:
        return self.stats["(model)"]

    def get_total_flops(self, as_string: bool = False) -> Any:
        v = self._root().flops
        return _fmt(v, "FLOPs") if as_string else v

    def get_total_macs(self, as_string: bool = False) -> Any:
        v = self._root().macs
        return _fmt(v, "MACs") if as_string else v

    def get_total_params(self, as_string: bool = False) -> Any:
        v = self._root().params
        return _fmt(v, "") if as_string else v

    def get_total_duration(self, as_string: bool = False) -> Any:
        v = self._root().latency
        return f"{v * 1e3:.2f} ms" if as_string else v

    # -- report -----------------------------------------------------------------------------------
    def format_profile(self, module_depth: int = -1, top_modules: int = 1, detailed: bool = True) -> str:
        root = self._root()
        lines = ["-" * 30 + " shardspeed flops profiler " + "-" * 30,
                 f"params: {_fmt(root.params, '')}   MACs: {_fmt(root.macs, 'MACs')}   "
                 f"FLOPs: {_fmt(root.flops, 'FLOPs')}   forward latency: {root.latency * 1e3:.2f} ms   "
                 f"FLOP/s: {_fmt(root.flops / root.latency, 'FLOPS') if root.latency else '-'}"]
        depths = sorted({s.depth for s in self.stats.values()})
        lines.append(f"top {top_modules} modules by MACs at each depth:")
        for d in depths:
            if module_depth >= 0 and d > module_depth:
                break
            at = sorted((s for s in self.stats.values() if s.depth == d), key=lambda s: -s.macs)[:top_modules]
            lines.append(f"  depth {d}: " + ", ".join(f"{s.name} ({s.kind}) {_fmt(s.macs, 'MACs')}" for s in at))
        if detailed:
            lines.append("per module: params, MACs, FLOPs, forward latency, share of total FLOPs")
            self._tree(root, lines, module_depth, root.flops)
        return "\n".join(lines)

    def _tree(self, s: ModuleStats, lines: list[str], max_depth: int, total: int) -> None:
        share = 100.0 * s.flops / total if total else 0.0
        lines.append(f"{'  ' * s.depth}{s.name} ({s.kind}): {_fmt(s.params, '')} params, {_fmt(s.macs, 'MACs')}, "
                     f"{_fmt(s.flops, 'FLOPs')}, {s.latency * 1e3:.2f} ms, {share:.2f}%")
        if max_depth >= 0 and s.depth >= max_depth:
            return
        for c in s.children:
            self._tree(self.stats[c], lines, max_depth, total)

    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                            detailed: bool = True, output_file: str | None = None) -> str:
        text = f"profile at step {profile_step}\n" + self.format_profile(module_depth, top_modules, detailed)
        if output_file:
            with open(output_file, "w") as f:
                f.write(text + "\n")
        else:
            print(text)
        return text


def param_count(m: torch.nn.Module) -> int:
    """A module's parameters (shared ones once); stage 3 placeholders count at their full size."""
    seen: set[int] = set()
    total = 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            shape = getattr(p, "ds_shape", None)
            total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


def _fmt(v: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {prefix}{unit}".rstrip()
    return f"{v:g} {unit}".rstrip()


def get_model_profile(model: torch.nn.Module, input_shape: tuple[int, ...] | None = None, args: Any = None,
                      kwargs: Any = None, print_profile: bool = True, detailed: bool = True,
                      module_depth: int = -1, top_modules: int = 1, warm_up: int = 1, as_string: bool = True,
                      output_file: str | None = None, ignore_modules: Any = None) -> tuple[Any, Any, Any]:
    """Profile one forward of ``model`` (after ``warm_up`` unprofiled ones); returns
    ``(flops, macs, params)``, formatted when ``as_string``. Give ``input_shape`` (a tensor of ones
    in the parameters' dtype is built) or ``args``/``kwargs``."""
    args = list(args or [])
    kwargs = dict(kwargs or {})
    if input_shape is not None:
        if args or kwargs:
            raise ValueError("get_model_profile: give input_shape or args/kwargs, not both")
        p = next(model.parameters(), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
        args = [torch.ones(input_shape, dtype=dtype, device=device)]
    elif not args and not kwargs:
        raise ValueError("get_model_profile needs input_shape, or the model's inputs as args/kwargs")
    with torch.no_grad():
        for _ in range(warm_up):
            model(*args, **kwargs)
        prof = FlopsProfiler(model, ignore_modules)
        prof.start_profile()
        try:
            model(*args, **kwargs)
        finally:
            prof.stop_profile()
    if print_profile:
        prof.print_model_profile(module_depth=module_depth, top_modules=top_modules, detailed=detailed,
                                 output_file=output_file)
    flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
    if as_string:
        return _fmt(flops, "FLOPs"), _fmt(macs, "MACs"), _fmt(params, "")
    return flops, macs, params
