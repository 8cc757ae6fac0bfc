"""Adam with DeepSpeed's options (``adam_w_mode``, ``bias_correction``) on torch's fused kernel.

[Note: which kernel] With bias correction on (the default) the step is torch's own Adam with
``fused=True`` where this torch has a fused kernel for the device (CPU since torch 2.4, CUDA), else
``foreach``. Torch has no switch to drop bias correction, so ``bias_correction=False`` runs our
multi-tensor (foreach) step. Both keep torch's state layout (step, exp_avg, exp_avg_sq), so state
dicts move between them and plain ``torch.optim.Adam``.

[Note: sparse gradients are lazy] A parameter whose gradient is a sparse tensor (an embedding built
with ``sparse=True`` under ``sparse_gradients``, zero/sparse.py) is stepped as
``torch.optim.SparseAdam`` steps it: only the rows (elements) the gradient holds move, and their
moments decay only when touched. The arithmetic is SparseAdam's, operation for operation, so the
result is bit for bit torch's; the touched rows of the moments are read with ``index_select`` where
torch's kernel masks the whole table (``sparse_mask``, 0.5 ms per moment for RScan's 300k x 64 table
against a few microseconds, measured: a third of that model's optimizer step). Weight decay, which SparseAdam lacks, is
applied to the touched rows only: decoupled (AdamW) as a shrink of those rows before the update,
L2 (``adam_w_mode=False``) added to their gradient. The state keeps Adam's layout (a tensor step),
so checkpoints slice it like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class FusedAdam(torch.optim.Adam):
    """Adam / AdamW. ``adam_w_mode=True`` (DeepSpeed's default) decouples weight decay (AdamW);
    ``False`` adds it to the gradient (classic Adam with L2)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, fused: bool | None = None,
                 foreach: bool | None = None, set_grad_none: bool = True):
        params = list(params)
        flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        if fused is None:
            fused = bias_correction and not amsgrad and foreach is None and _fused_supported(flat)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         fused=fused or None, foreach=None if fused else foreach,
                         decoupled_weight_decay=adam_w_mode)
        for group in self.param_groups:
            group.setdefault("bias_correction", bias_correction)
        self.set_grad_none = set_grad_none

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        sparse = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.is_sparse]
        for group, p in sparse:
            self._sparse_step(group, p)
        held = [(p, p.grad) for _, p in sparse]
        for p, _ in held:  # the dense step below must not see them
            p.grad = None
        try:
            if all(g["bias_correction"] for g in self.param_groups):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                self._foreach_step(group)
            return loss
        finally:
            for p, grad in held:
                p.grad = grad

    def _sparse_step(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """SparseAdam's update of ``p`` from its sparse gradient (Note: sparse gradients are lazy)."""
        if group["amsgrad"] or not group["bias_correction"]:
            raise ValueError("Adam on a sparse gradient (an embedding built with sparse=True) runs SparseAdam, which "
                             "has no amsgrad and always corrects bias: set amsgrad false and bias_correction true")
        grad = p.grad.coalesce()
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        lr, wd = float(group["lr"]), group["weight_decay"]
        if wd != 0 and grad._nnz():
            rows = grad.indices()[0]
            if group["decoupled_weight_decay"]:
                p.index_copy_(0, rows, p.index_select(0, rows).mul_(1 - lr * wd))
            else:
                grad = torch.sparse_coo_tensor(grad.indices(), grad.values() + wd * p.index_select(0, rows),
                                               grad.shape, is_coalesced=True, check_invariants=False)
        beta1, beta2 = group["betas"]
        _lazy_adam(p, grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"].item()), lr=lr, beta1=beta1, beta2=beta2,
                   eps=group["eps"], maximize=group.get("maximize", False))

    def _foreach_step(self, group: dict[str, Any]) -> None:
        if group["amsgrad"]:
            raise ValueError("FusedAdam: amsgrad with bias_correction=False is not supported")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"])
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        if group["bias_correction"]:
            step = steps[0].item()
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2**0.5)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)
        else:
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-lr)


def _lazy_adam(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, *,
               lr: float, beta1: float, beta2: float, eps: float, maximize: bool) -> None:
    """``torch.optim.SparseAdam``'s update of ``p`` from the coalesced sparse ``grad`` (one sparse
    dimension: rows of a table, or elements of a flat shard), in the same operations and order."""
    rows, values = grad._indices()[0], grad._values()
    if maximize:
        values = -values
    old_m = exp_avg.index_select(0, rows)
    m_update = values.sub(old_m).mul_(1 - beta1)
    exp_avg.index_add_(0, rows, m_update)
    old_v = exp_avg_sq.index_select(0, rows)
    v_update = values.pow(2).sub_(old_v).mul_(1 - beta2)
    exp_avg_sq.index_add_(0, rows, v_update)
    numer = m_update.add_(old_m)
    denom = v_update.add_(old_v).sqrt_().add_(eps)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    p.index_add_(0, rows, numer.div_(denom).mul_(-step_size))
