"""``engine.save_checkpoint`` / ``engine.load_checkpoint``: any world size and ZeRO stage in, any out.

Saved state is keyed by parameter name and flat element range (``Strategy.owned_pieces``), never by
rank or bucket, so loading into another world size or stage is a re-slice (``pieces.py``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from shardspeed.checkpoint import files
from shardspeed.checkpoint.files import CheckpointError
from shardspeed.checkpoint.pieces import fill, split_state
from shardspeed.comm import barrier, broadcast_object, get_rank, get_world_size, monitored_barrier

log = logging.getLogger("shardspeed")

SAVE_TIMEOUT_S = float(os.environ.get("SHARDSPEED_CHECKPOINT_TIMEOUT_S", "60"))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(y) for y in x) if isinstance(x, (list, tuple)) else x


def _payload(engine: Any) -> dict[str, Any]:
    """This rank's pieces: fp32 values and the optimizer's matching state slices."""
    opt = engine.optimizer
    pieces: dict[str, list[tuple]] = {}
    if engine.strategy.replicated and engine.topo.dp_rank != 0:
        return pieces
    for pc in engine.strategy.owned_pieces():
        flat = pc.master.detach().reshape(-1)
        values = flat[pc.offset:pc.offset + pc.length].clone()
        per_elem, scalars = ({}, {}) if opt is None else split_state(opt.state.get(pc.master, {}), pc.master)
        states = {k: v.reshape(-1)[pc.offset:pc.offset + pc.length].clone() for k, v in per_elem.items()}
        pieces.setdefault(pc.name, []).append((pc.start, pc.length, values, states, dict(scalars)))
    return pieces


def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str | None = None,
                    client_state: dict[str, Any] | None = None, save_latest: bool = True) -> bool:
    tag = tag or f"global_step{engine.global_steps}"
    monitored_barrier(f"save_checkpoint(tag={tag!r})", SAVE_TIMEOUT_S)
    engine.strategy.wait_reductions()
    root = Path(save_dir)
    tmp, final = root / f".{tag}.partial", root / tag
    rank, world = get_rank(), get_world_size()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    others = {n for n, _ in engine.module.named_parameters()} - engine.strategy.checkpointed_names()
    full = engine.module.state_dict() if others else {}  # frozen parameters (a collective under stage 3)
    files.atomic_save({"pieces": _payload(engine), "rng": _rng_state()}, tmp / files.rank_file(rank))
    barrier()
    if rank == 0:
        files.atomic_save(_common(engine, client_state, {n: full[n] for n in others}), tmp / files.COMMON)
        files.write_manifest(tmp, {"tag": tag, "world_size": world, "stage": engine.config.zero_optimization.stage,
                                   "dtype": engine.policy.compute_name, "global_steps": engine.global_steps,
                                   "param_shapes": {n: list(shape) for n, shape in _full_shapes(engine).items()}})
        files.publish(tmp, final, root, tag, save_latest)
    barrier()
    return True


def _full_shapes(engine: Any) -> dict[str, Any]:
    """Every parameter's full shape (under stage 3 the module only holds placeholders)."""
    known = engine.strategy.full_shapes() if hasattr(engine.strategy, "full_shapes") else {}
    return {n: torch.Size(known.get(n, p.shape)) for n, p in engine.module.named_parameters()}


def _common(engine: Any, client_state: dict[str, Any] | None, frozen: dict[str, torch.Tensor]) -> dict[str, Any]:
    opt, sched, loader = engine.optimizer, engine.lr_scheduler, engine.training_dataloader
    return {
        "counters": {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
                     "skipped_steps": engine.skipped_steps, "global_samples": engine.global_samples,
                     "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                     "samples_per_micro_step": engine.train_micro_batch_size_per_gpu() * engine.dp_world_size},
        "optimizer_groups": [] if opt is None else [{k: v for k, v in g.items() if k != "params"}
                                                    for g in opt.param_groups],
        "lr_scheduler": sched.state_dict() if sched is not None else None,
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None,
        "buffers": {n: b.detach().clone() for n, b in engine.module.named_buffers()},
        "frozen": {n: t.detach().clone() for n, t in frozen.items()},
        "loader": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "client_state": client_state or {},
        "config": engine.config.model_dump(mode="json"),
    }


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str | None = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False) -> tuple[str, dict[str, Any]]:
    root = Path(load_dir)
    tag = broadcast_object(files.resolve_tag(root, tag) if get_rank() == 0 else None)
    ckpt = root / tag
    manifest = files.read_manifest(ckpt)
    common = files.load_file(ckpt / files.COMMON)
    with_optimizer = load_optimizer_states and not load_module_only and engine.optimizer is not None
    _check_names(engine, manifest, load_module_strict)
    _load_pieces(engine, ckpt, manifest, with_optimizer, common["frozen"])
    _load_module_extras(engine, common, load_module_strict)
    if not load_module_only:
        _load_training_state(engine, common, ckpt, manifest, with_optimizer, load_lr_scheduler_states)
    barrier()
    return str(ckpt), common["client_state"]


def _check_names(engine: Any, manifest: dict[str, Any], strict: bool) -> None:
    saved = set(manifest["param_shapes"])
    mine = {n for n, _ in engine.module.named_parameters()}
    if strict and saved != mine:
        raise CheckpointError(f"checkpoint parameters do not match the model: missing from the checkpoint "
                              f"{sorted(mine - saved)}, not in the model {sorted(saved - mine)} "
                              "(load_module_strict=False loads the common ones)")


def _load_pieces(engine: Any, ckpt: Path, manifest: dict[str, Any], with_optimizer: bool,
                 frozen: dict[str, torch.Tensor]) -> None:
    wanted = [pc for pc in engine.strategy.owned_pieces() if pc.name in manifest["param_shapes"]]
    opt = engine.optimizer
    filled = [0] * len(wanted)
    writers = sorted(n for n in manifest["files"] if n.startswith("rank_"))
    # parameters saved whole (frozen where they were written) count as one piece each
    sources = [{n: [(0, t.numel(), t, {}, {})] for n, t in frozen.items()}]
    with torch.no_grad():
        for fname in [None, *writers]:
            pieces = sources[0] if fname is None else files.load_file(ckpt / fname)["pieces"]
            for i, pc in enumerate(wanted):
                saved = pieces.get(pc.name)
                if not saved:
                    continue
                dest = pc.master.view(-1)[pc.offset:pc.offset + pc.length]
                flat = [(s, n, v, st) for s, n, v, st, _ in saved]
                filled[i] += fill(dest, pc.start, flat)
                if with_optimizer:
                    state = opt.state[pc.master]
                    for key in saved[0][3]:
                        if key not in state:
                            state[key] = torch.zeros_like(pc.master)
                        fill(state[key].view(-1)[pc.offset:pc.offset + pc.length], pc.start, flat, key)
                    for key, value in saved[0][4].items():
                        state.setdefault(key, value.clone() if torch.is_tensor(value) else value)
    for pc, n in zip(wanted, filled, strict=True):
        if n != pc.length:
            raise CheckpointError(f"checkpoint {ckpt.resolve()} is incomplete: parameter '{pc.name}' elements "
                                  f"[{pc.start}, {pc.start + pc.length}) were found {n} times over, not once")
    engine.strategy.publish_masters()


def _load_module_extras(engine: Any, common: dict[str, Any], strict: bool) -> None:
    with torch.no_grad():
        buffers = dict(engine.module.named_buffers())
        for name, value in common["buffers"].items():
            if name in buffers:
                buffers[name].copy_(value)
            elif strict:
                raise CheckpointError(f"checkpoint buffer '{name}' is not in the model")
        params = dict(engine.module.named_parameters())
        pieced = engine.strategy.checkpointed_names()
        for name, value in common["frozen"].items():
            if name in params and name not in pieced:
                params[name].data.copy_(value)


def _restore_counters(engine: Any, saved: dict[str, Any]) -> int:
    """[Note: counters across layouts] ``micro_steps`` counts micro-batches of *this* run's size, so
    it means something else once the accumulation steps change (2 ranks x 2 micro-batches is 1 rank
    x 4): it is rebuilt from the global step, which every layout with the same global batch shares.
    Within an accumulation window (a save between two micro-batches) the partial gradients are not
    saved: with the same window length the offset into it is kept (and the step that ends it sees
    only the micro-batches after the load, said in the log); otherwise the run resumes at the start
    of the window. Returns the saved micro-batches dropped that way (the loader rewinds by them)."""
    for key in ("global_steps", "skipped_steps", "global_samples"):
        setattr(engine, key, saved[key])
    gas = engine.gradient_accumulation_steps()
    saved_gas = saved.get("gradient_accumulation_steps")
    if saved_gas is None:  # written before the counters carried it
        engine.micro_steps = saved["micro_steps"]
        return 0
    into_window = saved["micro_steps"] - saved["global_steps"] * saved_gas
    dropped = 0
    if into_window and saved_gas != gas:
        log.warning("checkpoint was saved %d micro-batches into an accumulation window of %d; resuming at the "
                    "start of a window of %d (partial gradients are not saved)", into_window, saved_gas, gas)
        into_window, dropped = 0, into_window
    elif into_window:
        log.warning("checkpoint was saved %d micro-batches into an accumulation window of %d: their gradients "
                    "were not saved, so the next step averages only the micro-batches after the load",
                    into_window, gas)
    engine.micro_steps = saved["global_steps"] * gas + into_window
    return dropped


def _load_training_state(engine: Any, common: dict[str, Any], ckpt: Path, manifest: dict[str, Any],
                         with_optimizer: bool, with_scheduler: bool) -> None:
    dropped = _restore_counters(engine, common["counters"])
    if with_optimizer:
        for group, saved in zip(engine.optimizer.param_groups, common["optimizer_groups"], strict=False):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    if with_scheduler and engine.lr_scheduler is not None and common["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(common["lr_scheduler"])
    if engine.loss_scaler is not None and common["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(common["loss_scaler"])
    loader = engine.training_dataloader
    if common["loader"] is not None and hasattr(loader, "load_state_dict"):
        state = dict(common["loader"])
        # the position counts this rank's micro-batches; in samples it survives a change of world
        # size or micro-batch size (the global batch is the same); micro-batches of a window the
        # load restarts are read again
        state["position"] -= dropped
        saved_per_micro = common["counters"].get("samples_per_micro_step")
        if saved_per_micro:
            here = engine.train_micro_batch_size_per_gpu() * engine.dp_world_size
            state["position"] = state["position"] * saved_per_micro // here
        loader.load_state_dict(state)
    own = ckpt / files.rank_file(get_rank())
    if manifest["world_size"] == get_world_size() and own.is_file():
        _set_rng_state(files.load_file(own)["rng"])  # the same rank's random streams: exact resume
