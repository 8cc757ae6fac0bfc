"""Adam with DeepSpeed's options (``adam_w_mode``, ``bias_correction``) on torch's fused kernel.

[Note: which kernel] With bias correction on (the default) the step is torch's own Adam with
``fused=True`` where this torch has a fused kernel for the device (CPU since torch 2.4, CUDA), else
``foreach``. Torch has no switch to drop bias correction, so ``bias_correction=False`` runs our
multi-tensor (foreach) step. Both keep torch's state layout (step, exp_avg, exp_avg_sq), so state
dicts move between them and plain ``torch.optim.Adam``.
"""

from __future__ import annotations

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
        if all(g["bias_correction"] for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._foreach_step(group)
        return loss

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
