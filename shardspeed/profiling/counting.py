"""How many multiply-accumulates and floating-point operations one aten op performs. Pure functions
of the op and its argument shapes.

[Note: what is counted]
- Matrix products (mm, addmm, bmm, baddbmm, convolution, fused attention): MACs are exact, one per
  multiply-add of the mathematical product; FLOPs are 2 x MACs plus the added bias/input elements.
  Attention counts Q.K^T and P.V in full, causal mask or not (the usual convention for MFU).
- Pointwise ops: one FLOP per output element, no MACs. Reductions: one per input element.
  Softmax 5 and layer/group/batch norm 5 per element (max, subtract, exp, sum, divide;
  mean, variance, normalise, scale, shift).
- Views, copies, indexing and fills: nothing (``clone`` carries torch's pointwise tag, but it
  moves data and computes nothing: a tensor-parallel layer's copies would otherwise count).
"""

from __future__ import annotations

import math
from typing import Any

import torch

aten = torch.ops.aten


def _numel(x: Any) -> int:
    return x.numel() if torch.is_tensor(x) else 0


def _mm(args: Any, out: Any) -> tuple[int, int]:
    a, b = args[0], args[1]
    macs = a.shape[0] * a.shape[1] * b.shape[1]
    return macs, 2 * macs


def _addmm(args: Any, out: Any) -> tuple[int, int]:
    macs, flops = _mm(args[1:], out)
    return macs, flops + _numel(out)


def _bmm(args: Any, out: Any) -> tuple[int, int]:
    a, b = args[0], args[1]
    macs = a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return macs, 2 * macs


def _baddbmm(args: Any, out: Any) -> tuple[int, int]:
    macs, flops = _bmm(args[1:], out)
    return macs, flops + _numel(out)


def _conv(args: Any, out: Any) -> tuple[int, int]:
    x, w, bias = args[0], args[1], args[2]
    transposed = bool(args[6]) if len(args) > 6 else False
    # the weight's second dimension is already per group: C_in/groups (C_out/groups transposed)
    kernel = math.prod(w.shape[2:])
    if transposed:  # every input element is scattered through the kernel to C_out/groups outputs
        macs = x.numel() * (w.shape[1]) * kernel
    else:  # every output element gathers C_in/groups x kernel inputs
        macs = out.numel() * (w.shape[1]) * kernel
    return macs, 2 * macs + (out.numel() if bias is not None else 0)


def _attention(args: Any, out: Any) -> tuple[int, int]:
    q, k, v = args[0], args[1], args[2]
    lead = math.prod(q.shape[:-2])
    tq, tk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    macs = lead * tq * tk * (d + dv)
    return macs, 2 * macs + 5 * lead * tq * tk  # softmax over the scores


_MATMUL = {aten.mm.default: _mm, aten.addmm.default: _addmm, aten.bmm.default: _bmm,
           aten.baddbmm.default: _baddbmm, aten.convolution.default: _conv}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        _MATMUL[getattr(aten, _name).default] = _attention

_PER_ELEMENT_5 = {"_softmax", "_log_softmax", "native_layer_norm", "native_group_norm",
                  "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "linalg_vector_norm", "prod"}
_COPIES = {"clone"}  # tagged pointwise by torch


def count(func: Any, args: Any, out: Any) -> tuple[int, int]:
    """(MACs, FLOPs) of one call of the aten overload ``func``."""
    fn = _MATMUL.get(func)
    if fn is not None:
        return fn(args, out)
    name = func.overloadpacket.__name__
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if name in _PER_ELEMENT_5:
        return 0, 5 * _numel(args[0])
    if name in _REDUCTIONS:
        return 0, _numel(args[0])
    if name in _COPIES:
        return 0, 0
    if torch.Tag.pointwise in func.tags and torch.is_tensor(first) and first.is_floating_point():
        return 0, first.numel()
    return 0, 0
