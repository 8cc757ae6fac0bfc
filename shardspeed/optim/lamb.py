"""LAMB (You et al., 2019): Adam's update rescaled per parameter by ||w|| / ||update||, clamped to
[min_coeff, max_coeff], with DeepSpeed's options: ``bias_correction``, ``max_grad_norm`` (clip the
gradients by their global norm before the update), ``max_coeff`` / ``min_coeff``.

[Note: norms of partitioned parameters] The trust ratio needs the norm of each FULL parameter. When
ZeRO gives this rank only a slice, the owner of the optimizer sets ``norm_reducer``: a function that
takes a vector of local squared norms (one entry per full parameter) and returns the global ones,
summed in one small collective. ``segments`` then maps each local tensor to its full parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

NormReducer = Callable[[torch.Tensor], torch.Tensor]


class FusedLamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, eps_inside_sqrt: bool = False,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, max_coeff: float = 10.0,
                 min_coeff: float = 0.01, amsgrad: bool = False):
        if amsgrad:
            raise ValueError("Lamb does not support amsgrad")
        if min_coeff > max_coeff:
            raise ValueError(f"Lamb: min_coeff {min_coeff} > max_coeff {max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        eps_inside_sqrt=eps_inside_sqrt, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.norm_reducer: NormReducer | None = None
        self._segments: dict[int, list[tuple[int, int, int]]] | None = None
        self._num_units = 0
        self.last_coeffs: list[torch.Tensor] = []

    def set_partition(self, segments: dict[int, list[tuple[int, int, int]]], num_params: int,
                      reducer: NormReducer) -> None:
        """Declare that each optimized tensor holds slices of full parameters: ``segments[id(t)]``
        lists (parameter index, offset in t, length); ``reducer`` sums a vector across the ranks
        that hold the other slices."""
        self._segments, self._num_units, self.norm_reducer = segments, num_params, reducer

    def _layout(self, params: list[torch.Tensor]) -> tuple[list[tuple[int, int, int, int]], int]:
        """(tensor index, unit, offset, length) for each piece, and the number of units (parameters
        whose norms are wanted): whole tensors, or the full parameters behind partition segments."""
        if self._segments is None:
            return [(i, i, 0, p.numel()) for i, p in enumerate(params)], len(params)
        return [(i, u, off, n) for i, p in enumerate(params) for u, off, n in self._segments[id(p)]], self._num_units

    @staticmethod
    def _pieces(tensors: list[torch.Tensor], layout: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
        return [tensors[i].view(-1)[off:off + n] for i, _, off, n in layout]

    def _unit_sq(self, tensor_lists: list[list[torch.Tensor]], layout: list[tuple[int, int, int, int]],
                 units: int) -> list[torch.Tensor]:
        """Squared L2 norm per unit for each list of tensors, finished across ranks in ONE collective."""
        # on the tensors' device: the partial norms are all-reduced (NCCL needs device tensors)
        device = tensor_lists[0][0].device if tensor_lists and tensor_lists[0] else None
        ids = torch.tensor([u for _, u, _, _ in layout], dtype=torch.long, device=device)
        vecs = []
        for tensors in tensor_lists:
            vec = torch.zeros(units, dtype=torch.float32, device=device)
            if layout:
                norms = torch.stack(torch._foreach_norm(self._pieces(tensors, layout))).float()
                vec.index_add_(0, ids, norms * norms)
            vecs.append(vec)
        both = torch.cat(vecs)
        if self.norm_reducer is not None:
            both = self.norm_reducer(both)
        return list(both.split(units))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_coeffs = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.last_coeffs.append(self._group_step(group, params))
        return loss

    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params]
        beta1, beta2 = group["betas"]
        layout, units = self._layout(params)
        if group["max_grad_norm"] > 0:
            total = self._unit_sq([grads], layout, units)[0].sum().sqrt()
            clip = (total + 1e-6) / group["max_grad_norm"]
            if clip > 1:
                grads = torch._foreach_div(grads, clip)
        m, v = [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)  # on the host: read each step, no device sync
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
        step = self.state[params[0]]["step"].item()
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if group["bias_correction"] else (1.0, 1.0)
        if group["eps_inside_sqrt"]:
            denom = torch._foreach_add(torch._foreach_div(v, bc2), group["eps"])
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(torch._foreach_div(v, bc2))
            torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(torch._foreach_div(m, bc1), denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_sq, u_sq = self._unit_sq([params, update], layout, units)
        w_norm, u_norm = w_sq.sqrt(), u_sq.sqrt()
        ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
        coeff = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        if layout:
            per_piece = coeff[torch.tensor([u for _, u, _, _ in layout], dtype=torch.long, device=coeff.device)]
            torch._foreach_mul_(self._pieces(update, layout), list(per_piece.unbind()))
        torch._foreach_add_(params, update, alpha=-group["lr"])
        return coeff
