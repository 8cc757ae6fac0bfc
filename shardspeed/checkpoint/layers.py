"""Layer-indexed names: what a pipeline stage's checkpoint entries are called, so that every layout
of the same layers (any P, T, D, ZeRO stage, and the plain ``nn.Sequential``) names them alike.

[Note: checkpoints keyed by layer index]
A ``PipelineModule`` stage registers layer i as child ``str(i)``, except tied modules, which live
under ``tied_modules.<key>``; ``PipelineModule.global_state_name`` maps each of its names to the
layer-indexed one (``"{i}.{param}"``, a tied weight under the index of the tie's first layer in the
model), which is the name ``nn.Sequential(layers)`` gives it. Checkpoint code keys everything it
writes by these names and maps back on load, so:
- every stage writes its own layers' pieces into its rank file (data-parallel shards as without a
  pipeline); a tied weight is written once, by its owner stage (non-owner copies carry
  ``ds_pipe_replicated``), and every stage that holds it loads it (values and optimizer state:
  the copies step alike, so they equal the owner's);
- the manifest's full shapes, slice marks and buffers are the union over the pipeline group, so
  the checkpoint describes the whole model whichever stage's rank 0 writes it;
- an ordinary engine's module has no ``global_state_name``: names pass through unchanged, which
  is why an ``nn.Sequential`` of the same layers reads and writes the same entries. There a tied
  weight is the parameter of the tie's first layer (``named_parameters`` lists a module that
  ``nn.Sequential`` registers twice under its first index only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shardspeed.comm import all_gather_object


def global_names(engine: Any) -> Callable[[str], str]:
    """Local state_dict name -> layer-indexed name (the identity for a module without stages)."""
    return getattr(engine.module, "global_state_name", lambda name: name)


def written_elsewhere(param: nn.Parameter) -> bool:
    """A pipeline tie's non-owner copy: its owner stage writes it (Note: checkpoints keyed by layer index)."""
    return bool(getattr(param, "ds_pipe_replicated", False))


def over_stages(engine: Any, mine: dict[str, Any]) -> dict[str, Any]:
    """The union of every pipeline stage's ``mine`` (keyed by global names; a tied entry held by
    several stages is the same on each). A collective over the pipeline group: every rank calls it."""
    group = engine.topo.pp_group
    if engine.topo.pp_world_size == 1 or group is None:
        return dict(mine)
    out: dict[str, Any] = {}
    for stage in all_gather_object(mine, group=group):
        out.update(stage)
    return out


def layer_record(module: nn.Module) -> dict[str, Any] | None:
    """What the manifest says about the model's layers: their count and, for a pipeline, how they were
    cut (only to explain a mismatch at load; loading never depends on it)."""
    if hasattr(module, "global_state_name"):  # a PipelineModule stage (checkpoint/ does not import pipe/)
        parts = module.partitions()
        return {"count": parts[-1], "pipeline_stages": len(parts) - 1, "partition": parts}
    if isinstance(module, nn.Sequential):
        return {"count": len(module), "pipeline_stages": None, "partition": None}
    return None


def _layer(name: str) -> int | None:
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def layer_mismatch(saved: set[str], model: set[str], saved_layers: dict[str, Any] | None,
                   module: nn.Module) -> str | None:
    """A message naming the first layer whose parameters differ between checkpoint and model, when
    both are layer-indexed; None when they agree or are not layer-indexed."""
    if not saved_layers or layer_record(module) is None:
        return None
    count = layer_record(module)["count"]
    by_layer: dict[int, tuple[list[str], list[str]]] = {}
    for name in sorted(saved ^ model):
        i = _layer(name)
        if i is None:
            return None
        by_layer.setdefault(i, ([], []))[name in model].append(name)
    if not by_layer:
        return None
    i = min(by_layer)
    only_saved, only_model = by_layer[i]
    how = (f" (saved by a PipelineModule of {saved_layers['pipeline_stages']} stages, partition "
           f"{saved_layers['partition']})" if saved_layers.get("pipeline_stages") else "")
    what = (f"the checkpoint has {only_saved[:4]} that this model does not" if only_saved else
            f"this model has {only_model[:4]} that the checkpoint does not")
    return (f"checkpoint holds a model of {saved_layers['count']} layers{how}, this model has {count}: layer {i} "
            f"differs: {what}; build the same list of layers to load it")
