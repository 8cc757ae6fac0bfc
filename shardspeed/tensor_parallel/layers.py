"""Tensor-parallel layers: ``nn.Linear`` cut by output columns or input rows, ``nn.Embedding`` cut by
vocabulary, and a LayerNorm for sequence-parallel regions. Each returns a tensor, like the layer it
replaces, and marks every parameter it slices (``meta.mark_sliced``).

[Note: initial values do not depend on T]
Every rank draws the FULL weight (and bias) from the default generator, exactly as the unsliced
layer would (``nn.Linear``'s and ``nn.Embedding``'s own initialisation, or ``init_method(full)``),
then keeps its slice (``take_slice``). So T = 1, 2 or 4 start from the same model, every rank's
generator advances by the same amount whatever T is (later layers match too), and a T-rank run is
comparable with plain PyTorch. The price is one full weight per rank while it is built, on the
layer's ``device``. With ``init_method`` the bias starts at zero (Megatron's convention).

[Note: what each rank holds]
- ``ColumnParallelLinear``: weight rows (output features) [r·out/T, (r+1)·out/T), with ``stride``
  s: the r-th 1/T of each of s blocks (a fused qkv is 3 blocks); the bias sliced alike. Its
  output is this rank's slice of the features, or, with ``gather_output``, the full output in the
  unsliced layer's order.
- ``RowParallelLinear``: weight columns (input features) [r·in/T, (r+1)·in/T); each rank's product
  is a partial sum, all-reduced (or reduce-scattered along the sequence); the bias is replicated
  and added once, after the reduction.
- ``VocabParallelEmbedding``: rows [r·num/T, (r+1)·num/T) of the table; a token outside this
  rank's rows contributes zeros, and the all-reduce adds the one rank that has it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from shardspeed.tensor_parallel.groups import TensorParallelGroup, divide, resolve
from shardspeed.tensor_parallel.mappings import (
    Group,
    _CopyToRegion,
    _GatherFromRegion,
    _GatherFromSequence,
    _ReduceFromRegion,
    _ReduceScatterToSequence,
    _ScatterToRegion,
)
from shardspeed.tensor_parallel.meta import (
    SliceSpec,
    join_slices,
    mark_sequence_parallel,
    mark_sliced,
    slice_spec,
    take_slice,
)

InitMethod = Callable[[torch.Tensor], Any]


def _full_linear(out_features: int, in_features: int, bias: bool, init_method: InitMethod | None,
                 device: Any, dtype: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unsliced weight and bias, drawn as ``nn.Linear`` draws them (weight first), or by
    ``init_method`` with a zero bias."""
    with torch.no_grad():
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        if init_method is None:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear.reset_parameters
        else:
            init_method(w)
        b = None
        if bias:
            b = torch.empty(out_features, device=device, dtype=dtype)
            if init_method is None:
                bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
                nn.init.uniform_(b, -bound, bound)
            else:
                b.zero_()
    return w, b


def _full_of(linear: nn.Module, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [out, in] weight and the bias of an existing layer (``transposed``: stored [in, out], as
    Hugging Face's Conv1D), detached: the sliced layer copies from them."""
    w = linear.weight.detach()
    if w.dim() != 2:
        raise ValueError(f"from_linear needs a 2-D weight, got {type(linear).__name__} with shape {tuple(w.shape)}")
    b = getattr(linear, "bias", None)
    return (w.t() if transposed else w), (b.detach() if b is not None else None)


def _copy_into(full: torch.Tensor) -> InitMethod:
    return lambda w: w.copy_(full)


def _keep_requires_grad(layer: nn.Module, linear: nn.Module) -> None:
    for name in ("weight", "bias"):
        src, dst = getattr(linear, name, None), getattr(layer, name, None)
        if src is not None and dst is not None:
            dst.requires_grad_(src.requires_grad)


def _store_transposed(layer: nn.Module) -> None:
    """[Note: transposed weights] A layer made from Hugging Face's ``Conv1D`` keeps its weight as the
    original stores it, [in, out] (this rank's slice of it), so its state dict, checkpoints,
    ``zero_to_fp32`` and ``save_16bit_model`` hold tensors of the original model's shapes, loadable
    into it. The slice mark names the cut dimension of that stored layout; forward multiplies by the
    transpose (a view, no copy)."""
    spec = slice_spec(layer.weight)
    w = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=layer.weight.requires_grad)
    mark_sliced(w, 1 - spec.dim, spec.stride)
    layer.weight = w
    layer.weight_transposed = True


def _sliced_parameter(full: torch.Tensor, spec: SliceSpec, tp: TensorParallelGroup) -> nn.Parameter:
    p = nn.Parameter(take_slice(full, spec, tp.world_size, tp.rank))
    mark_sliced(p, spec.dim, spec.stride)
    return p


class ColumnParallelLinear(nn.Module):
    """``y = x Aᵀ + b`` with A's output features (rows) split over the tensor-parallel ranks.

    Args:
        in_features, out_features: sizes of the unsliced layer; ``out_features`` must be divisible
            by T × ``stride``.
        bias: add a (sliced) bias.
        gather_output: all-gather the output into the full ``out_features`` (in the unsliced layer's
            order, also for ``stride`` > 1); False leaves this rank's ``out_features / T`` features,
            to feed a ``RowParallelLinear(input_is_parallel=True)``.
        init_method: ``init_method(full_weight)`` in place; default: ``nn.Linear``'s initialisation.
        stride: number of blocks the output dimension is made of (3 for a fused q/k/v projection),
            each cut T ways, so every rank holds whole heads of q, k and v.
        skip_bias_add: return ``(output, bias)`` without adding the bias (to fuse it downstream).
        sequence_parallel: the input is this rank's chunk of the sequence (dimension
            ``sequence_dim``); it is all-gathered here and the gradient reduce-scattered back.
        tp_group: the tensor-parallel process group; default: the current model-parallel unit's
            (none: T = 1, an ordinary linear layer).
        device, dtype: where and in what type the parameters are made (and the full weight drawn).
    """

    weight_transposed = False  # stored [in, out] (made from a Conv1D): Note: transposed weights

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 init_method: InitMethod | None = None, stride: int = 1, skip_bias_add: bool = False,
                 sequence_parallel: bool = False, sequence_dim: int = 0, tp_group: Group = None,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel=True expects a tensor-parallel consumer; "
                             "pass gather_output=False")
        self.tp = tp = resolve(tp_group)
        if skip_bias_add and gather_output and bias and tp.world_size > 1:
            raise ValueError("ColumnParallelLinear: skip_bias_add with gather_output would return the full output "
                             "but only this rank's slice of the bias; pass gather_output=False")
        if out_features % (tp.world_size * stride):
            raise ValueError(f"ColumnParallelLinear: out_features {out_features} is not divisible by the "
                             f"tensor-parallel size {tp.world_size}" + (f" × stride {stride}" if stride > 1 else ""))
        self.in_features, self.out_features, self.stride = in_features, out_features, stride
        self.output_size_per_partition = out_features // tp.world_size
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        w, b = _full_linear(out_features, in_features, bias, init_method, device, dtype)
        spec = SliceSpec(0, stride)
        self.weight = _sliced_parameter(w, spec, tp)
        self.bias = _sliced_parameter(b, spec, tp) if b is not None else None

    def forward(self, x: torch.Tensor) -> Any:
        tp = self.tp
        if self.sequence_parallel:
            x = _GatherFromSequence.apply(x, self.sequence_dim, tp, True)
        else:
            x = _CopyToRegion.apply(x, tp)
        weight = self.weight.t() if self.weight_transposed else self.weight
        out = F.linear(x, weight, None if self.skip_bias_add else self.bias)
        if self.gather_output and tp.world_size > 1:
            out = _GatherFromRegion.apply(out, -1, tp)
            if self.stride > 1:  # rank-major after the gather; the unsliced layer is block-major
                out = join_slices(list(out.chunk(tp.world_size, dim=-1)), SliceSpec(-1, self.stride))
        return (out, self.bias) if self.skip_bias_add else out

    @classmethod
    def from_linear(cls, linear: nn.Module, *, stride: int = 1, gather_output: bool = False,
                    transposed: bool = False, tp_group: Group = None) -> ColumnParallelLinear:
        """This rank's column slice of an existing layer (``nn.Linear``, or with ``transposed`` a
        layer whose weight is stored [in, out], as Hugging Face's ``Conv1D``): the same values, on its
        device and dtype, marked like any ``ColumnParallelLinear``; no random numbers are drawn.
        ``requires_grad`` is kept. ``stride`` and ``gather_output`` as in the constructor."""
        w, b = _full_of(linear, transposed)
        layer = cls(w.shape[1], w.shape[0], bias=b is not None, gather_output=gather_output, stride=stride,
                    init_method=_copy_into(w), tp_group=tp_group, device=w.device, dtype=w.dtype)
        if b is not None:  # init_method leaves the bias at zero
            with torch.no_grad():
                layer.bias.copy_(take_slice(b, SliceSpec(0, stride), layer.tp.world_size, layer.tp.rank))
        _keep_requires_grad(layer, linear)
        if transposed:
            _store_transposed(layer)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (this rank: "
                f"{self.output_size_per_partition}), bias={self.bias is not None}, gather_output={self.gather_output}"
                f", stride={self.stride}, tp={self.tp.rank}/{self.tp.world_size}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class RowParallelLinear(nn.Module):
    """``y = x Aᵀ + b`` with A's input features (columns) split over the tensor-parallel ranks; the
    partial products are summed across ranks, then the (replicated) bias is added once.

    Args:
        in_features, out_features: sizes of the unsliced layer; ``in_features`` divisible by T.
        bias: add a replicated bias after the reduction.
        input_is_parallel: the input already is this rank's slice of the features (the output of a
            ``ColumnParallelLinear(gather_output=False)``); False scatters a full input here.
        init_method: ``init_method(full_weight)`` in place; default: ``nn.Linear``'s initialisation.
        skip_bias_add: return ``(output, bias)`` without adding the bias.
        sequence_parallel: reduce-scatter the output along ``sequence_dim`` instead of all-reducing
            it, leaving each rank its chunk of the sequence (needs ``input_is_parallel``). The bias's
            gradient is then all-reduced over the tensor-parallel group by this layer (it is marked
            ``sequence_parallel``; see ``meta``'s note).
        tp_group, device, dtype: as in ``ColumnParallelLinear``.
    """

    weight_transposed = False  # stored [in, out] (made from a Conv1D): Note: transposed weights

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 init_method: InitMethod | None = None, skip_bias_add: bool = False, sequence_parallel: bool = False,
                 sequence_dim: int = 0, tp_group: Group = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (its input "
                             "comes from a ColumnParallelLinear(gather_output=False))")
        self.tp = tp = resolve(tp_group)
        self.input_size_per_partition = divide(in_features, tp.world_size, "RowParallelLinear: in_features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        w, b = _full_linear(out_features, in_features, bias, init_method, device, dtype)
        self.weight = _sliced_parameter(w, SliceSpec(1), tp)
        self.bias = nn.Parameter(b) if b is not None else None
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> Any:
        tp = self.tp
        if not self.input_is_parallel:
            x = _ScatterToRegion.apply(x, -1, tp)
        out = F.linear(x, self.weight.t() if self.weight_transposed else self.weight)
        if self.sequence_parallel:
            out = _ReduceScatterToSequence.apply(out, self.sequence_dim, tp)
        else:
            out = _ReduceFromRegion.apply(out, tp)
        bias = self.bias
        if bias is not None and self.sequence_parallel:
            bias = _CopyToRegion.apply(bias, tp)  # each rank saw its chunk: sum the gradient
        if self.skip_bias_add:
            return out, bias
        return out + bias if bias is not None else out

    @classmethod
    def from_linear(cls, linear: nn.Module, *, input_is_parallel: bool = True, transposed: bool = False,
                    tp_group: Group = None) -> RowParallelLinear:
        """This rank's row slice of an existing layer, as ``ColumnParallelLinear.from_linear``; the
        bias is copied whole (replicated). ``input_is_parallel`` defaults to True: the input is the
        local output of a column layer, as AutoTP wires them."""
        w, b = _full_of(linear, transposed)
        layer = cls(w.shape[1], w.shape[0], bias=b is not None, input_is_parallel=input_is_parallel,
                    init_method=_copy_into(w), tp_group=tp_group, device=w.device, dtype=w.dtype)
        if b is not None:
            with torch.no_grad():
                layer.bias.copy_(b)
        _keep_requires_grad(layer, linear)
        if transposed:
            _store_transposed(layer)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.input_size_per_partition}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, tp={self.tp.rank}/{self.tp.world_size}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with the vocabulary (rows) split over the tensor-parallel ranks.

    Args:
        num_embeddings: vocabulary size, divisible by T (pad the vocabulary otherwise).
        embedding_dim: size of each vector.
        padding_idx: as ``nn.Embedding``: that row starts at zero and gets no gradient.
        init_method: ``init_method(full_weight)`` in place; default: ``nn.Embedding``'s (normal 0, 1).
        sequence_parallel: reduce-scatter the output along ``sequence_dim`` (each rank keeps its
            chunk of the sequence) instead of all-reducing it.
        tp_group, device, dtype: as in ``ColumnParallelLinear``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 init_method: InitMethod | None = None, sequence_parallel: bool = False, sequence_dim: int = 0,
                 tp_group: Group = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.tp = tp = resolve(tp_group)
        if num_embeddings % tp.world_size:
            raise ValueError(f"VocabParallelEmbedding: num_embeddings {num_embeddings} is not divisible by the "
                             f"tensor-parallel size {tp.world_size}; pad the vocabulary to a multiple of "
                             f"{tp.world_size} (e.g. {-(-num_embeddings // tp.world_size) * tp.world_size})")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} must be within num_embeddings {num_embeddings}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        per = num_embeddings // tp.world_size
        self.vocab_start_index, self.vocab_end_index = tp.rank * per, (tp.rank + 1) * per
        with torch.no_grad():
            full = torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
            if init_method is None:
                nn.init.normal_(full)  # nn.Embedding.reset_parameters
            else:
                init_method(full)
            if padding_idx is not None:
                full[padding_idx].zero_()
        self.weight = _sliced_parameter(full, SliceSpec(0), tp)
        local_pad = None if padding_idx is None else padding_idx - self.vocab_start_index
        self._local_padding_idx = local_pad if local_pad is not None and 0 <= local_pad < per else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        if tp.world_size > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        else:
            outside, local = None, ids
        out = F.embedding(local, self.weight, self._local_padding_idx)
        if outside is not None:  # another rank holds these rows: contribute zeros (and no gradient)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return _ReduceScatterToSequence.apply(out, self.sequence_dim, tp)
        return _ReduceFromRegion.apply(out, tp)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (this rank: rows {self.vocab_start_index}-"
                f"{self.vocab_end_index - 1}), padding_idx={self.padding_idx}, tp={self.tp.rank}/{self.tp.world_size}")


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` for a sequence-parallel region: the input is this rank's chunk of the
    sequence, so the weight and bias gradients are partial; this layer all-reduces them over the
    tensor-parallel group in backward (parameters marked ``sequence_parallel``; see ``meta``'s note).
    Same arguments as ``nn.LayerNorm``, plus ``tp_group``."""

    def __init__(self, normalized_shape: Any, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 tp_group: Group = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.tp = resolve(tp_group)
        for p in self.parameters(recurse=False):
            mark_sequence_parallel(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _CopyToRegion.apply(self.weight, self.tp) if self.weight is not None else None
        bias = _CopyToRegion.apply(self.bias, self.tp) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
