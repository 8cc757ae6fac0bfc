"""Tensor slicing (Megatron-style model parallelism): sliced layers, region mappings, RNG tracker,
and the slice mark every other layer reads (``meta``).

A plain model (Hugging Face GPT-2, BERT, Llama, ...) is sliced by ``autotp(model, T)`` or by the
config's ``"tensor_parallel": {"autotp_size": T}``; ``plan_autotp`` shows the plan without applying it.

Set up the groups first (``shardspeed.initialize_model_parallel(tensor_parallel_size=T)``), then
build the model from these layers on every rank; each layer slices itself for the current
unit's tensor-parallel group (or takes ``tp_group=``).
"""

from shardspeed.tensor_parallel.autotp import apply_plan, autotp, is_tensor_parallel
from shardspeed.tensor_parallel.autotp_plan import HeadFix, Placement, Plan, Rule, plan_autotp
from shardspeed.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from shardspeed.tensor_parallel.groups import TensorParallelGroup, current_tensor_parallel_group
from shardspeed.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    VocabParallelEmbedding,
)
from shardspeed.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from shardspeed.tensor_parallel.meta import (
    SliceSpec,
    copy_slice_mark,
    is_sequence_parallel,
    join_slices,
    mark_sequence_parallel,
    mark_sliced,
    slice_spec,
    take_slice,
)
from shardspeed.tensor_parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, get_rng_tracker, model_parallel_seed

__all__ = [
    "ColumnParallelLinear", "HeadFix", "MODEL_PARALLEL_RNG", "Placement", "Plan", "RNGStatesTracker",
    "RowParallelLinear", "Rule", "SequenceParallelLayerNorm", "SliceSpec", "TensorParallelGroup",
    "VocabParallelEmbedding", "apply_plan", "autotp", "copy_slice_mark", "copy_to_tensor_parallel_region",
    "current_tensor_parallel_group", "gather_from_sequence_parallel_region", "gather_from_tensor_parallel_region",
    "get_rng_tracker", "is_sequence_parallel", "is_tensor_parallel", "join_slices", "mark_sequence_parallel",
    "mark_sliced", "model_parallel_seed", "plan_autotp", "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region", "slice_spec", "take_slice", "vocab_parallel_cross_entropy",
]
