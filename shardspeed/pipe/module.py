"""``PipelineModule``: a model written as a list of layers, cut into pipeline stages, of which each
rank builds and runs only its own.

[Note: layer indices name everything]
Layer i of the list is registered as child ``str(i)`` on the stage that owns it, exactly the name
``nn.Sequential`` gives it, so a stage's ``state_dict`` keys (``"{i}.{param}"``) are those of the plain
``nn.Sequential`` of the same layers, for any number of stages. A tied key's module lives in
``tied_modules[key]`` (one module per stage, shared by that stage's occurrences); its *global* names
are given by ``global_state_name``: the tied parameters (``tied_weight_attr``) take the index of the
key's first occurrence in the whole model, so every stage names its copy alike and a checkpoint keeps
one; the tie module's other parameters take the index of its first occurrence on this stage.
``global_state_dict()`` / ``load_global_state_dict()`` speak these names, which a checkpoint written
at one (P, stage) loads at any other, and into ``nn.Sequential`` (whose ``state_dict`` repeats a shared
module under every index that uses it, so each global name is one of its keys).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardspeed.activation.checkpointing import checkpoint
from shardspeed.comm import (
    PipeDataParallelTopology,
    PipeModelDataParallelTopology,
    ProcessTopology,
    broadcast_object,
    get_model_parallel_unit,
    get_rank,
    get_world_size,
    initialize_model_parallel,
)
from shardspeed.pipe.partition import (
    layer_type_weights,
    parameter_weights,
    partition_balanced,
    partition_uniform,
    profile_weights,
)
from shardspeed.pipe.spec import LayerSpec, TiedLayerSpec

__all__ = ["PipelineModule", "TiedWeightGroup"]

PIPE_AXIS = "pipe"


@dataclass
class TiedWeightGroup:
    """Everything the engine needs about one tie ``key``.

    ``stages`` (ascending) hold the key; ``stages[0]`` is its owner: the source of the broadcast at
    start, the one that counts it in the gradient norm and writes it to a checkpoint. ``rank_lists``
    are the global ranks that sum its gradients, one list per (data, model) coordinate, in the order
    every rank must create their process groups. ``module``/``local_names``/``params`` are this
    stage's (None/empty where this stage does not hold the key).
    """

    key: str
    attrs: list[str]
    layer_indices: list[int]
    stages: list[int]
    global_names: list[str]
    rank_lists: list[list[int]]
    module: nn.Module | None = None
    local_names: list[str] = field(default_factory=list)

    @property
    def owner_stage(self) -> int:
        return self.stages[0]

    def params(self) -> list[nn.Parameter]:
        """This stage's tied parameters, in ``attrs`` order."""
        return [] if self.module is None else [_get_attr(self.module, a) for a in self.attrs]


class PipelineModule(nn.Module):
    """Layers cut into pipeline stages; this rank builds and runs its stage's part.

    Args:
        layers: ``nn.Module`` s (already built on every rank), ``LayerSpec`` / ``TiedLayerSpec`` s (built
            only by the stage that owns them) or plain callables (``lambda x: x.flatten(1)``).
        num_stages: pipeline stages P, with the data-parallel size world // P; or
        topology: a ``ProcessTopology`` with a ``pipe`` axis. Without either, the current
            ``ModelParallelUnit`` (``shardspeed.initialize_model_parallel``) supplies it.
        loss_fn: ``loss_fn(outputs, labels)``, used by the engine on the last stage.
        seed_layers: build layer i under seed ``base_seed + i`` (with ``seed_fn(seed)`` if given,
            else ``torch.manual_seed``), so initial weights do not depend on P. A tied key is seeded
            by its first index in the model, so every stage builds the same initial tied weights.
        partition_method: ``"uniform"`` (layer counts), ``"parameters"`` (trainable parameter
            counts), ``"type:<regex>"`` (layers whose class name matches, case-insensitive) or
            ``"profile"`` (measured forward + backward seconds on ``profile_input``).
        activation_checkpoint_interval: recompute every this many layers in backward (0: never).
            A run of layers without parameters is not checkpointed (nothing to save by recomputing);
            with ``checkpointable_layers`` (class names), only runs made entirely of those are.
        activation_checkpoint_func: ``func(function, *args)``; ``shardspeed.checkpointing.checkpoint``.
        profile_input: the first layer's input for ``partition_method="profile"``. Every rank builds
            and times every layer; rank 0's timings are broadcast so all ranks cut alike.
        stage_id: build stage ``stage_id`` whatever this process's rank: for tests and tools that
            hold several stages in one process. Then ``num_stages`` alone means data-parallel size 1,
            and the topology's size need not match the world.
    """

    def __init__(self, layers: Iterable[Any], num_stages: int | None = None, topology: ProcessTopology | None = None,
                 loss_fn: Callable[..., Any] | None = None, seed_layers: bool = False,
                 seed_fn: Callable[[int], Any] | None = None, base_seed: int = 1234,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable[..., Any] = checkpoint,
                 checkpointable_layers: Sequence[str] | None = None, *, profile_input: Any = None,
                 stage_id: int | None = None):
        super().__init__()
        self._layer_specs = _check_layers(layers)
        self._topo, self.stage_id = _place_stage(num_stages, topology, stage_id)
        self.num_stages = self._topo.get_dim(PIPE_AXIS)
        self._unit = None
        if len(self._layer_specs) < self.num_stages:
            raise ValueError(f"PipelineModule: {len(self._layer_specs)} layers cannot fill {self.num_stages} pipeline "
                             f"stages (each stage needs at least one layer); use at most "
                             f"{len(self._layer_specs)} stages or split the model into more layers")
        if activation_checkpoint_interval < 0:
            raise ValueError(f"PipelineModule: activation_checkpoint_interval must be >= 0, got "
                             f"{activation_checkpoint_interval}")
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = None if checkpointable_layers is None else list(checkpointable_layers)
        self.parts = self._partition(partition_method, profile_input)
        self._local_start, self._local_stop = self.parts[self.stage_id], self.parts[self.stage_id + 1]
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self.forward_funcs: list[Callable[[Any], Any]] = []
        self._build()

    # -- DeepSpeed's accessors ---------------------------------------------------------------------
    def topology(self) -> ProcessTopology:
        return self._topo

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def partitions(self) -> list[int]:
        """Stage boundaries, length P + 1: stage s holds layers ``parts[s] <= i < parts[s + 1]``."""
        return list(self.parts)

    def stage_owner(self, layer_idx: int) -> int:
        """The stage that holds layer ``layer_idx``."""
        if not 0 <= layer_idx < len(self._layer_specs):
            raise ValueError(f"stage_owner(): layer {layer_idx} is not in this model of {len(self._layer_specs)} "
                             f"layers (0..{len(self._layer_specs) - 1})")
        return next(s for s in range(self.num_stages) if layer_idx < self.parts[s + 1])

    def local_layer_indices(self) -> range:
        """Global indices of this stage's layers, in forward order."""
        return range(self._local_start, self._local_stop)

    def mpu(self) -> Any:
        """The ``ModelParallelUnit`` of this module's topology: the current one, or one made now with
        ``initialize_model_parallel`` (a collective: every rank must call this; the engine does)."""
        if self._unit is None:
            unit = get_model_parallel_unit()
            if unit is None or unit.topology() != _as_grid(self._topo):
                t = max(1, self._topo.get_dim("model"))
                unit = initialize_model_parallel(tensor_parallel_size=t, pipeline_parallel_size=self.num_stages)
            self._unit = unit
        return self._unit

    # -- partition ---------------------------------------------------------------------------------------
    def _partition(self, method: str, profile_input: Any) -> list[int]:
        layers, p = self._layer_specs, self.num_stages
        known = "'uniform', 'parameters', 'type:<regex>' or 'profile'"
        if not isinstance(method, str):
            raise ValueError(f"PipelineModule: partition_method must be {known}, got {method!r}")
        kind = method.lower()
        if kind == "uniform":
            return partition_uniform(len(layers), p)
        if kind == "parameters":
            return partition_balanced(parameter_weights(layers), p)
        if kind.startswith("type:"):
            pattern = method[len("type:"):]
            weights = layer_type_weights(layers, pattern)
            parts = partition_balanced(weights, p)
            empty = [s for s in range(p) if not any(weights[parts[s]:parts[s + 1]])]
            if empty:
                matched = [i for i, w in enumerate(weights) if w]
                raise ValueError(f"PipelineModule: partition_method {method!r} matches {len(matched)} layer(s) "
                                 f"{matched} for {p} stages, so stage {empty[0]} would have no layers of that type; "
                                 f"match at least {p} layers (class names: "
                                 f"{sorted({_name(x) for x in layers})}) or use 'parameters'")
            return parts
        if kind == "profile":
            if profile_input is None:
                raise ValueError("PipelineModule: partition_method='profile' times each layer on a sample; pass "
                                 "profile_input=<the first layer's input>")
            seconds = profile_weights(layers, profile_input)
            return partition_balanced(broadcast_object(seconds, src=0), p)
        raise ValueError(f"PipelineModule: unknown partition_method {method!r}; use {known}")

    # -- building this stage -------------------------------------------------------------------------------
    def _build(self) -> None:
        first_index = {}  # tie key -> first layer index in the whole model
        for i, layer in enumerate(self._layer_specs):
            if isinstance(layer, TiedLayerSpec):
                first_index.setdefault(layer.key, i)
        # seeding per layer must not leave the caller's generator in a state that depends on the stage
        with torch.random.fork_rng(devices=[]) if self.seed_layers else contextlib.nullcontext():
            for i in self.local_layer_indices():
                self.forward_funcs.append(self._build_layer(i, first_index))

    def _build_layer(self, i: int, first_index: dict[str, int]) -> Callable[[Any], Any]:
        layer = self._layer_specs[i]
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in self.tied_modules:
                self._seed(first_index[layer.key])
                self.tied_modules[layer.key] = layer.build()
                self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
            module = self.tied_modules[layer.key]
            return module if layer.forward_fn is None else functools.partial(layer.forward_fn, module)
        if isinstance(layer, LayerSpec):
            self._seed(i)
            layer = layer.build()
        if isinstance(layer, nn.Module):
            self.add_module(str(i), layer)
        return layer

    def _seed(self, layer_idx: int) -> None:
        if self.seed_layers:
            (self.seed_fn or torch.manual_seed)(self.base_seed + layer_idx)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, forward_input: Any) -> Any:
        """This stage's layers in order; a tuple output is passed on as one argument (the next layer
        unpacks it). With ``activation_checkpoint_interval`` k, every run of k layers is recomputed."""
        funcs, k = self.forward_funcs, self.activation_checkpoint_interval
        if k == 0:
            return _run(funcs)(forward_input)
        x = forward_input
        for start in range(0, len(funcs), k):
            chunk = funcs[start:start + k]
            if self._checkpointable(chunk):
                x = self.activation_checkpoint_func(_run(chunk), *(x if isinstance(x, tuple) else (x,)))
            else:
                x = _run(chunk)(x)
        return x

    def _checkpointable(self, funcs: Sequence[Callable[[Any], Any]]) -> bool:
        if self.checkpointable_layers is not None:
            return all(_name(_module_of(f)) in self.checkpointable_layers for f in funcs)
        return any(next(m.parameters(), None) is not None for f in funcs if (m := _module_of(f)) is not None)

    # -- ties and names for the engine ---------------------------------------------------------------------
    def tied_weight_groups(self) -> dict[str, TiedWeightGroup]:
        """Every tie key of the model (also those this stage does not hold), by key, sorted."""
        occurrences: dict[str, list[int]] = {}
        attrs: dict[str, list[str]] = {}
        for i, layer in enumerate(self._layer_specs):
            if isinstance(layer, TiedLayerSpec):
                occurrences.setdefault(layer.key, []).append(i)
                attrs.setdefault(layer.key, layer.tied_weight_attr)
        pipe_lists = self._topo.get_axis_comm_lists(PIPE_AXIS)
        groups = {}
        for key in sorted(occurrences):
            stages = sorted({self.stage_owner(i) for i in occurrences[key]})
            module = self.tied_modules[key] if key in self.tied_modules else None
            groups[key] = TiedWeightGroup(
                key=key, attrs=list(attrs[key]), layer_indices=occurrences[key], stages=stages,
                global_names=[f"{occurrences[key][0]}.{a}" for a in attrs[key]],
                rank_lists=[[ranks[s] for s in stages] for ranks in pipe_lists], module=module,
                local_names=[f"tied_modules.{key}.{a}" for a in attrs[key]] if module is not None else [])
        return groups

    def global_state_name(self, local_name: str) -> str:
        """The layer-indexed name (see the module's note) of a key of this stage's ``state_dict``."""
        if not local_name.startswith("tied_modules."):
            return local_name
        key, _, rest = local_name[len("tied_modules."):].partition(".")
        specs = self._layer_specs
        if rest in self.tied_weight_attrs[key]:
            first = next(i for i, x in enumerate(specs) if isinstance(x, TiedLayerSpec) and x.key == key)
        else:
            first = next(i for i in self.local_layer_indices()
                         if isinstance(specs[i], TiedLayerSpec) and specs[i].key == key)
        return f"{first}.{rest}"

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's ``state_dict`` under layer-indexed names."""
        return {self.global_state_name(k): v for k, v in self.state_dict().items()}

    def load_global_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load this stage's tensors from a layer-indexed ``state`` (a ``global_state_dict`` of any
        stage split, merged, or the ``state_dict`` of the plain ``nn.Sequential``); entries for other
        stages' layers are ignored. ``strict``: every tensor of this stage must be found."""
        local = self.state_dict()
        names = {k: self.global_state_name(k) for k in local}
        missing = sorted(g for g in names.values() if g not in state)
        if missing and strict:
            raise KeyError(f"load_global_state_dict(): stage {self.stage_id} (layers {self._local_start}.."
                           f"{self._local_stop - 1}) needs {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                           f"absent from the given state")
        self.load_state_dict({k: state[g] for k, g in names.items() if g in state}, strict=False)

    def extra_repr(self) -> str:
        return (f"stage {self.stage_id} of {self.num_stages}: layers {self._local_start}..{self._local_stop - 1} "
                f"(partition {self.parts}, method {self.partition_method!r})")


# -- helpers ---------------------------------------------------------------------------------------------
def _run(funcs: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    def run(*inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else inputs
        for f in funcs:
            x = f(x)
        return x
    return run


def _module_of(f: Any) -> nn.Module | None:
    if isinstance(f, nn.Module):
        return f
    if isinstance(f, functools.partial) and f.args and isinstance(f.args[0], nn.Module):
        return f.args[0]  # a tied occurrence with forward_fn
    return None


def _name(x: Any) -> str:
    if isinstance(x, LayerSpec):
        return x.typename.__name__
    return type(x).__name__ if isinstance(x, nn.Module) else getattr(x, "__name__", type(x).__name__)


def _get_attr(module: nn.Module, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), module)


def _check_layers(layers: Iterable[Any]) -> list[Any]:
    out = list(layers)
    if not out:
        raise ValueError("PipelineModule: layers is empty")
    for i, layer in enumerate(out):
        if not (isinstance(layer, LayerSpec | nn.Module) or callable(layer)):
            raise TypeError(f"PipelineModule: layer {i} is a {type(layer).__name__}; a layer must be an nn.Module, "
                            f"a LayerSpec/TiedLayerSpec or a callable")
        if isinstance(layer, TiedLayerSpec) and ("." in layer.key or not layer.key.isprintable()):
            raise ValueError(f"PipelineModule: layer {i}: tie key {layer.key!r} cannot contain '.' (it names a module)")
    return out


def _place_stage(num_stages: int | None, topology: ProcessTopology | None,
                 stage_id: int | None) -> tuple[ProcessTopology, int]:
    """The topology and this process's pipeline stage (see the class's ``num_stages``/``topology``/``stage_id``)."""
    unit = get_model_parallel_unit()
    if num_stages is not None and (isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"PipelineModule: num_stages must be a positive integer, got {num_stages!r}")
    world = get_world_size()
    if topology is None and unit is not None:
        topology = unit.topology()
    if topology is None:
        if num_stages is None:
            raise ValueError("PipelineModule needs num_stages=P or topology=ProcessTopology(...) (or call "
                             "shardspeed.initialize_model_parallel(pipeline_parallel_size=P) first)")
        if stage_id is not None:
            world = num_stages
        if world % num_stages:
            raise ValueError(f"PipelineModule: num_stages {num_stages} does not divide the world size {world}: the "
                             f"ranks cannot form equal data-parallel replicas of the pipeline; use a num_stages that "
                             f"divides {world}")
        topology = PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)
    if topology.get_dim(PIPE_AXIS) == 0:
        raise ValueError(f"PipelineModule: topology {topology} has no 'pipe' axis")
    p = topology.get_dim(PIPE_AXIS)
    if num_stages is not None and num_stages != p:
        raise ValueError(f"PipelineModule: num_stages {num_stages} disagrees with the topology's {p} pipeline stages")
    if stage_id is None:
        if topology.world_size() != world:
            raise ValueError(f"PipelineModule: the topology {topology} has {topology.world_size()} ranks but the "
                             f"world has {world}; its sizes must multiply to the world size")
        stage_id = getattr(topology.get_coord(get_rank()), PIPE_AXIS)
    elif isinstance(stage_id, bool) or not isinstance(stage_id, int) or not 0 <= stage_id < p:
        raise ValueError(f"PipelineModule: stage_id {stage_id!r} is not a stage of {p} (0..{p - 1})")
    return topology, stage_id


def _as_grid(topo: ProcessTopology) -> ProcessTopology:
    """``topo`` as the (pipe, data, model) grid the model-parallel unit builds, if it lays ranks out
    the same way (a (pipe, data) topology is the grid with model size 1); else refused."""
    dims = {a: max(1, topo.get_dim(a)) for a in ("pipe", "data", "model")}
    grid = PipeModelDataParallelTopology(num_pp=dims["pipe"], num_mp=dims["model"], num_dp=dims["data"])
    same = set(topo.get_axis_names()) <= set(dims) and grid.world_size() == topo.world_size() and all(
        getattr(grid.get_coord(r), a) == getattr(topo.get_coord(r), a) for r in range(grid.world_size())
        for a in topo.get_axis_names())
    if not same:
        raise ValueError(f"PipelineModule.mpu(): topology {topo} does not lay ranks out as (pipe, data, model) "
                         f"with model innermost, the layout the model-parallel unit builds groups for")
    return grid
