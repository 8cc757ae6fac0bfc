"""``engine.save_checkpoint`` / ``engine.load_checkpoint``: any world size, tensor-parallel size and
ZeRO stage in, any out.

Saved state is keyed by parameter name and flat element range (``Strategy.owned_pieces``), never by
rank or bucket, and a tensor-parallel slice carries where it sits in the full parameter (pieces.py,
Note: slices in checkpoints), so loading into another layout is a re-slice. A pipeline stage names
its entries by layer index (layers.py, Note: checkpoints keyed by layer index), so loading at
another number of stages, or into the plain ``nn.Sequential``, is one too.

[Note: who writes what] Each rank writes the pieces it owns, except copies: under a replicating
strategy (stage 0) only data-parallel rank 0 writes, and a parameter replicated across the
tensor-parallel group (no slice mark) only by tensor-parallel rank 0, and a pipeline tie only by its
owner stage. Parameters the strategy does not hold (frozen ones at stages 0-2) are written whole by
the same rule. So every element of every full parameter is saved exactly once, which loading checks.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from shardspeed.checkpoint import files, layers
from shardspeed.checkpoint.files import CheckpointError
from shardspeed.checkpoint.pieces import copy_into, layout_for, split_state, transfers
from shardspeed.comm import all_gather, barrier, broadcast_object, get_rank, get_world_size, monitored_barrier
from shardspeed.tensor_parallel.meta import SliceSpec, join_slices, slice_spec

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


def _spec(engine: Any, name: str, p: torch.Tensor) -> SliceSpec | None:
    """The slice mark of parameter ``name``; refuses a slice marked without the dimension it was cut along."""
    spec = slice_spec(p)
    if spec is None and getattr(p, "model_parallel", False) and engine.topo.tp_world_size > 1:
        raise CheckpointError(
            f"parameter '{name}' is marked model_parallel but not with the dimension it was cut along, which a "
            "checkpoint needs to place the slice in the full parameter: mark it with "
            "shardspeed.tensor_parallel.mark_sliced(param, dim, stride) instead")
    return spec


def _sliced(engine: Any) -> dict[str, SliceSpec]:
    """The tensor-parallel slice mark of each sliced parameter, by name."""
    specs = {name: _spec(engine, name, p) for name, p in engine.module.named_parameters()}
    return {name: spec for name, spec in specs.items() if spec is not None}


def _payload(engine: Any, sliced: dict[str, SliceSpec]) -> dict[str, Any]:
    """This rank's pieces: fp32 values and the optimizer's matching state slices (Note: who writes what)."""
    opt = engine.optimizer
    pieces: dict[str, list[tuple]] = {}
    topo = engine.topo
    if engine.strategy.replicated and topo.dp_rank != 0:
        return pieces
    mine = [(pc.name, pc.start, pc.length, pc.master, pc.offset) for pc in engine.strategy.owned_pieces()]
    if topo.dp_rank == 0:  # parameters the strategy does not hold: each data-parallel rank has them whole
        pieced = engine.strategy.checkpointed_names()
        mine += [(n, 0, p.numel(), p.detach(), 0) for n, p in engine.module.named_parameters() if n not in pieced]
    elsewhere = {n for n, p in engine.module.named_parameters() if layers.written_elsewhere(p)}
    gname = layers.global_names(engine)
    for name, start, length, master, offset in mine:
        if (name not in sliced and topo.tp_rank != 0) or name in elsewhere:
            continue
        flat = master.detach().reshape(-1)
        values = flat[offset:offset + length].float().clone()
        per_elem, scalars = ({}, {}) if opt is None else split_state(opt.state.get(master, {}), master)
        states = {k: v.reshape(-1)[offset:offset + length].clone() for k, v in per_elem.items()}
        pieces.setdefault(gname(name), []).append((start, length, values, states, dict(scalars)))
    return pieces


def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str | None = None,
                    client_state: dict[str, Any] | None = None, save_latest: bool = True) -> bool:
    tag = tag or f"global_step{engine.global_steps}"
    sliced = _sliced(engine)  # refuses on every rank alike, before any rank waits for another
    monitored_barrier(f"save_checkpoint(tag={tag!r})", SAVE_TIMEOUT_S)
    model = _whole_model(engine, sliced)  # every stage's names, before rank 0 writes the manifest
    engine.strategy.wait_reductions()
    root = Path(save_dir)
    tmp, final = root / f".{tag}.partial", root / tag
    rank, world = get_rank(), get_world_size()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with _state_resident(engine):
        pieces = _payload(engine, sliced)
    files.atomic_save({"pieces": pieces, "rng": _rng_state(), "tp_rank": engine.topo.tp_rank},
                      tmp / files.rank_file(rank))
    barrier()
    if rank == 0:
        tp = engine.topo.tp_world_size
        files.atomic_save(_common(engine, client_state, model["buffers"]), tmp / files.COMMON)
        files.write_manifest(tmp, {"tag": tag, "world_size": world, "stage": engine.config.zero_optimization.stage,
                                   "dtype": engine.policy.compute_name, "global_steps": engine.global_steps,
                                   "param_shapes": model["shapes"], "layers": layers.layer_record(engine.module),
                                   "tensor_parallel": {"world_size": tp, "sliced": model["sliced"]}})
        files.publish(tmp, final, root, tag, save_latest)
    barrier()
    return True


def _state_resident(engine: Any) -> Any:
    """Optimizer state on disk (offload_optimizer) is read into memory around what saves or loads
    it as tensors, and written back after (zero/swap_optimizer.py)."""
    swapper = getattr(engine, "optimizer_swapper", None)
    return swapper.all_resident() if swapper is not None else nullcontext()


def _whole_model(engine: Any, sliced: dict[str, SliceSpec]) -> dict[str, dict[str, Any]]:
    """Full shapes, slice marks and persistent buffers of the whole model under layer-indexed names:
    this stage's, joined over the pipeline group (a collective: every rank calls it)."""
    gname = layers.global_names(engine)
    return {"shapes": layers.over_stages(engine, {gname(n): list(s) for n, s in _full_shapes(engine, sliced).items()}),
            "sliced": layers.over_stages(engine, {gname(n): [s.dim, s.stride] for n, s in sliced.items()}),
            "buffers": layers.over_stages(engine, {gname(n): b.detach().clone()
                                                   for n, b in _persistent_buffers(engine.module)})}


def _held_shapes(engine: Any) -> dict[str, tuple[int, ...]]:
    """The shape of each parameter as this rank holds it before ZeRO partitions it (its slice under
    tensor parallelism; under stage 3 the module only holds placeholders)."""
    known = engine.strategy.full_shapes() if hasattr(engine.strategy, "full_shapes") else {}
    return {n: tuple(known.get(n, p.shape)) for n, p in engine.module.named_parameters()}


def _full_shapes(engine: Any, sliced: dict[str, SliceSpec]) -> dict[str, tuple[int, ...]]:
    """Every parameter's full (unsliced) shape."""
    out = {}
    for name, shape in _held_shapes(engine).items():
        full = list(shape)
        if name in sliced:
            full[sliced[name].dim] *= engine.topo.tp_world_size
        out[name] = tuple(full)
    return out


def full_module_state(engine: Any) -> dict[str, torch.Tensor]:
    """The module's ``state_dict()`` with every tensor-parallel slice joined into its full parameter:
    one all-gather over the tensor-parallel group per sliced parameter, so every rank calls it."""
    state = engine.module.state_dict()
    topo = engine.topo
    if topo.tp_world_size == 1:
        return state
    for name, p in engine.module.named_parameters(remove_duplicate=False):  # tied weights under each name
        spec = _spec(engine, name, p)
        if spec is None or name not in state:
            continue
        local = state[name].detach().contiguous()
        out = torch.empty(topo.tp_world_size * local.numel(), dtype=local.dtype, device=local.device)
        all_gather(out, local.view(-1), group=topo.tp_group)
        state[name] = join_slices(list(out.view(topo.tp_world_size, *local.shape).unbind(0)), spec)
    return state


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``module.state_dict()`` holds: a buffer registered ``persistent=False`` (Hugging
    Face's GPT-2 attention masks) is rebuilt by its module, and a consolidated checkpoint holding it
    would not load into the model (unexpected keys)."""
    out = []
    for prefix, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def _common(engine: Any, client_state: dict[str, Any] | None, buffers: dict[str, torch.Tensor]) -> dict[str, Any]:
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
        "buffers": buffers,
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
    model = layers.over_stages(engine, _model_names(engine))  # the whole model's names, every stage's
    _check_names(engine, manifest, {n for n, kind in model.items() if kind == "param"}, load_module_strict)
    with _state_resident(engine):
        _load_pieces(engine, ckpt, manifest, with_optimizer, common.get("frozen", {}))
    engine.strategy.publish_masters()
    _load_module_extras(engine, common, {n for n, kind in model.items() if kind == "buffer"}, load_module_strict)
    if not load_module_only:
        _load_training_state(engine, common, ckpt, manifest, with_optimizer, load_lr_scheduler_states)
    barrier()
    return str(ckpt), common["client_state"]


def _model_names(engine: Any) -> dict[str, str]:
    """This stage's parameter and persistent buffer names, layer-indexed: name -> "param" / "buffer"."""
    gname = layers.global_names(engine)
    out = {gname(n): "buffer" for n, _ in engine.module.named_buffers()}
    out.update({gname(n): "param" for n, _ in engine.module.named_parameters()})
    return out


def _check_names(engine: Any, manifest: dict[str, Any], mine: set[str], strict: bool) -> None:
    """``mine``: the whole model's parameter names (every stage's)."""
    saved = set(manifest["param_shapes"])
    if strict and saved != mine:
        by_layer = layers.layer_mismatch(saved, mine, manifest.get("layers"), engine.module)
        if by_layer:
            raise CheckpointError(f"{by_layer} (load_module_strict=False loads the common ones)")
        raise CheckpointError(f"checkpoint parameters do not match the model: missing from the checkpoint "
                              f"{sorted(mine - saved)}, not in the model {sorted(saved - mine)} "
                              "(load_module_strict=False loads the common ones)")


def _load_pieces(engine: Any, ckpt: Path, manifest: dict[str, Any], with_optimizer: bool,
                 frozen_v1: dict[str, torch.Tensor]) -> None:
    """Fill every piece this rank holds, optimizer state included, from whichever saved pieces
    overlap it (pieces.py); ``frozen_v1``: whole tensors a format-1 checkpoint kept in common.pt."""
    # keyed by the names this rank's module uses; the checkpoint's are layer-indexed (layers.py)
    gname = layers.global_names(engine)
    params = dict(engine.module.named_parameters())
    glob = {n: gname(n) for n in params}
    saved_shapes = {n: tuple(s) for n, s in manifest["param_shapes"].items()}
    shapes = {n: saved_shapes[g] for n, g in glob.items() if g in saved_shapes}
    saved_tp = manifest.get("tensor_parallel") or {"world_size": 1, "sliced": {}}
    pieced = engine.strategy.checkpointed_names()
    # (name, flat start, length, destination tensor, offset in it, with optimizer state)
    wanted = [(pc.name, pc.start, pc.length, pc.master, pc.offset, with_optimizer)
              for pc in engine.strategy.owned_pieces() if pc.name in shapes]
    wanted += [(n, 0, p.numel(), p.data, 0, False) for n, p in params.items() if n not in pieced and n in shapes]
    held, topo = _held_shapes(engine), engine.topo
    mine = {n: layout_for(glob[n], shapes[n], slice_spec(params[n]), topo.tp_world_size, topo.tp_rank, held[n])
            for n in params if n in shapes}  # in model order: the first mismatch is the one named
    cuts = {n: layout_for(glob[n], shapes[n], SliceSpec(*saved_tp["sliced"][glob[n]]), saved_tp["world_size"], 0)
            for n in mine if glob[n] in saved_tp["sliced"]}
    sources = [({n: [(0, t.numel(), t, {}, {})] for n, t in frozen_v1.items()}, 0)]
    for fname in sorted(n for n in manifest["files"] if n.startswith("rank_")):
        data = files.load_file(ckpt / fname)  # mmap'd: only the pages of pieces read below are loaded
        sources.append((data["pieces"], data.get("tp_rank", 0)))
    with torch.no_grad():
        for name, start, length, master, offset, with_state in wanted:
            saved = [(*piece, rank) for pieces, rank in sources for piece in pieces.get(glob[name], ())]
            dest = master.view(-1)[offset:offset + length]
            state = engine.optimizer.state[master] if with_state else None
            got = 0
            for k, d, s in transfers((start, length), mine[name], [(x[0], x[1], x[5]) for x in saved], cuts.get(name)):
                _, _, values, states, scalars, _ = saved[k]
                got += copy_into(dest, values.reshape(-1), d, s)
                if state is None:
                    continue
                for key, v in states.items():
                    if key not in state:
                        state[key] = torch.zeros_like(master)
                    copy_into(state[key].view(-1)[offset:offset + length], v.reshape(-1), d, s)
                for key, value in scalars.items():
                    state.setdefault(key, value.clone() if torch.is_tensor(value) else value)
            if got != length:
                raise CheckpointError(f"checkpoint {ckpt.resolve()} is incomplete or inconsistent: parameter "
                                      f"'{glob[name]}' elements [{start}, {start + length}) of this rank got {got} "
                                      f"values, not {length}")


def _load_module_extras(engine: Any, common: dict[str, Any], model_buffers: set[str], strict: bool) -> None:
    """Buffers, by layer-indexed name: this stage's are copied, another stage's are its own business,
    and ``model_buffers`` (every stage's) decides what the model lacks."""
    gname = layers.global_names(engine)
    with torch.no_grad():
        buffers = {gname(n): b for n, b in engine.module.named_buffers()}
        for name, value in common["buffers"].items():
            if name in buffers:
                buffers[name].copy_(value)
            elif strict and name not in model_buffers:
                raise CheckpointError(f"checkpoint buffer '{name}' is not in the model")


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
