"""FLOPs profiler: parameters, MACs, FLOPs and forward latency of every module of a model.

Counting happens at the aten level (a ``TorchDispatchMode``), so it sees what actually runs,
whatever Python code called it (``F.linear``, ``x @ w``, fused attention); ``counting.py`` says
what each op costs. A stack of the modules currently in ``forward`` (forward pre/post hooks)
attributes every op to each enclosing module.

[Note: FLOPs under tensor slicing] Each rank counts what it runs: a sliced layer's matmuls are its
own 1/T share. The model's FLOPs (what MFU divides by) count the whole model once, so the work
every tensor-parallel rank repeats identically (LayerNorms, residual adds, a replicated head) must
count once, not T times. Which is which follows the data: a tensor differs across tensor-parallel
ranks when it is a sliced parameter or was computed from one, until a collective makes it whole
again (all-reduce, all-gather; a reduce-scatter makes it differ). An op none of whose inputs
differ runs identically on every rank: its FLOPs are "replicated" (``get_replicated_flops``), and
the model's FLOPs are the sum over tensor-parallel ranks of their own FLOPs less the replicated
part, plus the replicated part once. Without sliced parameters nothing is tracked and everything
is replicated.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from shardspeed.accelerator import get_accelerator
from shardspeed.profiling.counting import count
from shardspeed.tensor_parallel.meta import slice_spec


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


def _is_sliced_param(p: torch.Tensor) -> bool:
    return slice_spec(p) is not None or bool(getattr(p, "model_parallel", False))


class _SliceTracker:
    """Which tensors differ across tensor-parallel ranks (Note: FLOPs under tensor slicing)."""

    def __init__(self, sliced_params: set[int]):
        self.params = sliced_params
        self._differ: dict[int, weakref.ref] = {}  # tensors computed from slices, by id, while alive

    def differs(self, t: torch.Tensor) -> bool:
        if id(t) in self.params or (t._base is not None and id(t._base) in self.params):
            return True
        ref = self._differ.get(id(t))
        return ref is not None and ref() is t

    def _set(self, t: torch.Tensor, differs: bool) -> None:
        key = id(t)
        if differs:
            self._differ[key] = weakref.ref(t, lambda _r, k=key: self._differ.pop(k, None))
        else:
            self._differ.pop(key, None)

    @staticmethod
    def _collective(func: Any, args: Any) -> tuple[list[Any], bool] | None:
        """(what a collective writes, whether that then differs across ranks); None for other ops.
        c10d's in-place collectives declare no writes in their schemas, hence by name."""
        name = func.overloadpacket.__name__
        if func.namespace == "c10d":
            if "allreduce" in name or "broadcast" in name:
                return list(args), False
            if "allgather" in name:
                return [args[0]], False
            if "reduce_scatter" in name:
                return [args[0]], True
            return [], False
        if func.namespace == "_c10d_functional" and name != "wait_tensor":  # these return new tensors
            return [], "reduce_scatter" in name
        return None

    def record(self, func: Any, args: Any, kwargs: Any, out: Any) -> bool:
        """Note what ``func`` wrote; True when it computed on tensors that are alike on every rank."""
        collective = self._collective(func, args)
        if collective is not None:
            written, differs = collective
            replicated = True  # moves data: nothing this profile counts
        else:
            schema = func._schema.arguments
            written = [a for a, spec in zip(args, schema, strict=False) if spec.alias_info and spec.alias_info.is_write]
            written += [kwargs[spec.name] for spec in schema
                        if spec.name in kwargs and spec.alias_info and spec.alias_info.is_write]
            differs = any(self.differs(t) for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t))
            replicated = not differs
        for t in tree_flatten((out, written))[0]:
            if torch.is_tensor(t):
                self._set(t, differs)
        return replicated


class _Counter(TorchDispatchMode):
    def __init__(self, profiler: FlopsProfiler):
        super().__init__()
        self.profiler = profiler

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        prof = self.profiler
        out = func(*args, **(kwargs or {}))
        macs, flops = count(func, args, out)
        replicated = prof._tracker.record(func, args, kwargs or {}, out) if prof._tracker is not None else True
        if macs or flops:
            for name in prof._stack:
                s = prof.stats[name]
                s.macs += macs
                s.flops += flops
            if replicated:
                prof.replicated_flops += flops
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
        self._tracker: _SliceTracker | None = None
        self.replicated_flops = 0  # Note: FLOPs under tensor slicing
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
        sliced = {id(p) for p in self.model.parameters() if _is_sliced_param(p)}
        self._tracker = _SliceTracker(sliced) if sliced else None
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
        self.replicated_flops = 0

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

    def get_replicated_flops(self, as_string: bool = False) -> Any:
        """The part of ``get_total_flops()`` every tensor-parallel rank computes identically (all of
        it without sliced parameters): counted once in the model's FLOPs."""
        v = self.replicated_flops
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
        if self._tracker is not None:
            lines.append(f"tensor slicing: this rank's own counts; {_fmt(self.replicated_flops, 'FLOPs')} of them "
                         "run identically on every tensor-parallel rank (counted once in the model's FLOPs)")
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
    """A module's parameters on this rank (shared ones once); stage 3 placeholders count at their
    full size, a tensor-parallel slice at its own."""
    return sum(param_counts(m))


def param_counts(m: torch.nn.Module) -> tuple[int, int]:
    """(elements of tensor-parallel slices, elements of other parameters) this rank holds: the
    model has T times the first plus the second."""
    sliced = replicated = 0
    for p in m.parameters():  # each shared parameter once
        shape = getattr(p, "ds_shape", None)
        n = int(torch.Size(shape).numel()) if shape is not None else p.numel()
        if _is_sliced_param(p):
            sliced += n
        else:
            replicated += n
    return sliced, replicated


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
