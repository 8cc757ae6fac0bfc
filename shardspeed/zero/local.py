"""Stage 0 with nothing to communicate: one data-parallel rank, no model parallelism, fp32.

Gradients stay where autograd puts them (``param.grad``), exactly as in a plain PyTorch loop: no
flat buffers to fill, zero or copy, so the engine costs what the loop costs. Chosen once by
``make_strategy``; with more ranks, or bf16/fp16 (fp32 accumulation buffers), the data-parallel
strategy applies.
"""

from __future__ import annotations

import torch

from shardspeed.zero.strategy import Strategy


class LocalStrategy(Strategy):
    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for _, p in self.named_params if p.grad is not None]

    def master_for(self, param: torch.nn.Parameter) -> torch.Tensor:
        if not param.requires_grad:
            raise ValueError("the optimizer holds a parameter with requires_grad=False")
        return param

    def finish_backward(self) -> None:
        pass

    def wait_reductions(self) -> None:
        pass

    def grad_norm_sq(self) -> torch.Tensor:
        grads = self._grads()
        if not grads:
            return self.zero_norm()
        return torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)]).sum()

    def grad_pieces(self) -> list[tuple[str, int, torch.Tensor]]:
        return [(n, 0, p.grad.view(-1)) for n, p in self.named_params if p.grad is not None]

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        grads = self._grads()
        if grads:
            torch._foreach_mul_(grads, factor)

    def after_step(self) -> None:
        pass

    def zero_grad(self) -> None:
        for _, p in self.named_params:
            p.grad = None

    def state_bytes(self) -> dict[str, int]:
        params = sum(p.numel() * p.element_size() for _, p in self.named_params)
        grads = sum(g.numel() * g.element_size() for g in self._grads())
        return {"parameters": params, "gradients": grads, "master_parameters": 0}
