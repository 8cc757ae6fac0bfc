"""DeepSpeed's model-state estimators, by name and arguments, answered by shardspeed's planner.

DeepSpeed's versions multiply the parameter count by fixed bytes-per-parameter factors. These make
a plan (plan.py) of what shardspeed's strategies allocate for the same setting: model states, the
bounded buffers, and the largest transient (gathered units, gradient buckets, autograd's largest
gradient), so the figures match a run, not a formula. Conventions kept from DeepSpeed so callers
read them the same way:
- a GPU setting: "device" is one accelerator per rank, "host" the CPU memory of one node (all
  ``num_gpus_per_node`` ranks together), ``additional_buffer_factor`` multiplies the host figure
  (headroom for what no planner sees: pinned-memory rounding, the data loader);
- mixed precision by default (``compute_dtype="fp16"``; "bf16" and "fp32" are accepted);
- the model is loaded on the host before training (fp32, once per rank) unless ``zero_init``.
Activations are not included. ``cpu_offload`` / ``cpu_offload_params`` are
``offload_optimizer`` / ``offload_param`` with ``device: cpu``.
"""

from __future__ import annotations

from typing import Any

import torch

from shardspeed.zero.planner.plan import Plan, make_plan
from shardspeed.zero.planner.settings import load_plan_config, settings_from_config
from shardspeed.zero.planner.spec import ModelSpec, spec_from_count, spec_from_module

GB = 2**30


def _plan(spec: ModelSpec, stage: int, world: int, offload_optimizer: bool, offload_param: bool, zero_init: bool,
          compute_dtype: str, config: dict[str, Any] | None) -> Plan:
    data: dict[str, Any] = dict(config or {})
    zero = dict(data.get("zero_optimization") or {})
    zero["stage"] = stage
    for key, on in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        zero[key] = {"device": "cpu" if on else "none"}
    data["zero_optimization"] = zero
    data.setdefault("train_batch_size", world)
    if compute_dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"compute_dtype {compute_dtype!r}: expected 'fp16', 'bf16' or 'fp32'")
    if compute_dtype != "fp32" and "fp16" not in data and "bf16" not in data:
        data[compute_dtype] = {"enabled": True}
    cfg, offload = load_plan_config(data)
    settings = settings_from_config(cfg, world, device_type="cuda", zero_init=zero_init, offload=offload)
    return make_plan(spec, settings)


def _host_per_node(plan: Plan, num_gpus_per_node: int, additional_buffer_factor: float, zero_init: bool) -> int:
    # loading: each rank builds the model on the host in fp32 before moving it (not under zero.Init)
    load = 0 if zero_init else plan.spec.total * 4
    per_rank = max(plan.peak("host"), load)
    return int(per_rank * num_gpus_per_node * additional_buffer_factor)


def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = True, additional_buffer_factor: float = 1.5, *,
                                          largest_layer_params: int | None = None, compute_dtype: str = "fp16",
                                          config: dict[str, Any] | None = None,
                                          spec: ModelSpec | None = None) -> tuple[int, int]:
    """(host bytes per node, device bytes per rank) for ZeRO-2 on ``total_params`` parameters."""
    spec = spec or spec_from_count(total_params, largest_layer_params)
    plan = _plan(spec, 2, num_gpus_per_node * num_nodes, cpu_offload, False, False, compute_dtype, config)
    return _host_per_node(plan, num_gpus_per_node, additional_buffer_factor, False), plan.peak("device")


def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                                          zero_init: bool = True, additional_buffer_factor: float = 1.5, *,
                                          compute_dtype: str = "fp16", config: dict[str, Any] | None = None,
                                          spec: ModelSpec | None = None) -> tuple[int, int, int]:
    """(host bytes per node, device bytes per rank, bytes of the largest layer gathered) for ZeRO-3."""
    if cpu_offload_params and not cpu_offload:
        raise ValueError("cpu_offload_params=True needs cpu_offload=True (parameters go to the host only with the "
                         "optimizer state), as in DeepSpeed")
    spec = spec or spec_from_count(total_params, largest_layer_params)
    plan = _plan(spec, 3, num_gpus_per_node * num_nodes, cpu_offload, cpu_offload_params, zero_init, compute_dtype,
                 config)
    largest = spec.largest_unit * plan.settings.compute_bytes
    return (_host_per_node(plan, num_gpus_per_node, additional_buffer_factor, zero_init), plan.peak("device"),
            largest)


def _header(stage: int, num_gpus_per_node: int, num_nodes: int, spec: ModelSpec, compute_dtype: str,
            largest: int | None) -> None:
    size = f"{spec.total / 1e6:.0f}M parameters" + (f", largest layer {largest / 1e6:.0f}M" if largest else "")
    print(f"shardspeed ZeRO-{stage} model-state memory (states + bounded buffers + largest transient; "
          f"no activations), {compute_dtype} compute")
    print(f"  setting: {num_nodes} node(s) x {num_gpus_per_node} device(s); model: {size}")
    print(f"  {'host/node':>10} | {'device/rank':>11} | options")


def _row(host: int, device: int, options: str) -> None:
    print(f"  {host / GB:>8.2f}GB | {device / GB:>9.2f}GB | {options}")


def _zero2_table(spec: ModelSpec, num_gpus_per_node: int, num_nodes: int, additional_buffer_factor: float,
                 compute_dtype: str, config: dict[str, Any] | None) -> None:
    _header(2, num_gpus_per_node, num_nodes, spec, compute_dtype, None)
    for offload in (True, False):
        host, dev = estimate_zero2_model_states_mem_needs(
            spec.total, num_gpus_per_node, num_nodes, offload, additional_buffer_factor,
            compute_dtype=compute_dtype, config=config, spec=spec)
        _row(host, dev, f"offload_optimizer={'cpu' if offload else 'none'}")


def _zero3_table(spec: ModelSpec, num_gpus_per_node: int, num_nodes: int, additional_buffer_factor: float,
                 compute_dtype: str, config: dict[str, Any] | None) -> None:
    _header(3, num_gpus_per_node, num_nodes, spec, compute_dtype, spec.largest_unit)
    for opt, par in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            host, dev, _ = estimate_zero3_model_states_mem_needs(
                spec.total, spec.largest_unit, num_gpus_per_node, num_nodes, opt, par, zero_init,
                additional_buffer_factor, compute_dtype=compute_dtype, config=config, spec=spec)
            _row(host, dev, f"offload_param={'cpu' if par else 'none'}, offload_optimizer={'cpu' if opt else 'none'}, "
                            f"zero_init={int(zero_init)}")


def estimate_zero2_model_states_mem_needs_all_live(model: torch.nn.Module, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1, additional_buffer_factor: float = 1.5, *,
                                                   compute_dtype: str = "fp16",
                                                   config: dict[str, Any] | None = None) -> None:
    """Print ZeRO-2's memory for ``model`` (its real layout) with and without optimizer offload."""
    _zero2_table(spec_from_module(model), num_gpus_per_node, num_nodes, additional_buffer_factor, compute_dtype, config)


def estimate_zero2_model_states_mem_needs_all_cold(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5, *,
                                                   largest_layer_params: int | None = None,
                                                   compute_dtype: str = "fp16",
                                                   config: dict[str, Any] | None = None) -> None:
    """Print ZeRO-2's memory for ``total_params`` parameters (layout assumed: spec.py, Note: a
    parameter count alone) with and without optimizer offload."""
    _zero2_table(spec_from_count(total_params, largest_layer_params), num_gpus_per_node, num_nodes,
                 additional_buffer_factor, compute_dtype, config)


def estimate_zero3_model_states_mem_needs_all_live(model: torch.nn.Module, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1, additional_buffer_factor: float = 1.5, *,
                                                   compute_dtype: str = "fp16",
                                                   config: dict[str, Any] | None = None) -> None:
    """Print ZeRO-3's memory for ``model`` (its real units) for each offload / zero.Init choice."""
    _zero3_table(spec_from_module(model), num_gpus_per_node, num_nodes, additional_buffer_factor, compute_dtype, config)


def estimate_zero3_model_states_mem_needs_all_cold(total_params: int, largest_layer_params: int,
                                                   num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5, *,
                                                   compute_dtype: str = "fp16",
                                                   config: dict[str, Any] | None = None) -> None:
    """Print ZeRO-3's memory for ``total_params`` parameters whose largest layer holds
    ``largest_layer_params``, for each offload / zero.Init choice."""
    _zero3_table(spec_from_count(total_params, largest_layer_params), num_gpus_per_node, num_nodes,
                 additional_buffer_factor, compute_dtype, config)
