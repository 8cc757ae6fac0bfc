"""Tensor slicing (Megatron-style model parallelism): sliced layers, region mappings, RNG tracker,
AutoTP, and the slice mark every other layer reads (``meta``)."""

from shardspeed.tensor_parallel.meta import SliceSpec, copy_slice_mark, join_slices, mark_sliced, slice_spec, take_slice

__all__ = ["SliceSpec", "copy_slice_mark", "join_slices", "mark_sliced", "slice_spec", "take_slice"]
