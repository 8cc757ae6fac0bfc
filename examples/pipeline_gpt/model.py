"""The GPT of ``layers.py`` as a ``PipelineModule`` (shardspeed's, DeepSpeed-style specs) and as the
plain ``nn.Sequential`` of the same layers, which a pipelined run must equal.

    module = pipeline_gpt(cfg, num_stages=2)            # or topology=unit.topology(), tp=T
    engine, _, loader, _ = shardspeed.initialize(args=args, model=module, training_data=data)
    loss = engine.train_batch(iter(loader))

Each layer is built under the seed ``base_seed + index`` (``seed_layers=True``), so initial values
do not depend on the number of stages P; the tensor-parallel layers draw their full weight and keep
their slice, so they do not depend on T either (they are not the plain layers' draws).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from examples.gpt_model import GPTConfig
from examples.pipeline_gpt.layers import build_layers, gpt_layer_plan, to_specs
from shardspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

__all__ = ["pipeline_gpt", "sequential_gpt"]


def pipeline_gpt(c: GPTConfig, num_stages: int | None = None, topology: Any = None, tp: int = 1, tied: bool = True,
                 base_seed: int = 1234, **kwargs: Any) -> PipelineModule:
    """The GPT as a ``PipelineModule``: token embedding (tied to the head), positions, ``c.layers``
    blocks (tensor-parallel ones when ``tp > 1``), final norm, head; next-token loss. ``kwargs`` go to
    ``PipelineModule`` (``partition_method``, ``activation_checkpoint_interval``, ``stage_id`` ...)."""
    plan, loss = gpt_layer_plan(c, tp=tp, tied=tied)
    kwargs.setdefault("partition_method", "parameters")
    return PipelineModule(to_specs(plan, LayerSpec, TiedLayerSpec), num_stages=num_stages, topology=topology,
                          loss_fn=loss, seed_layers=True, base_seed=base_seed, **kwargs)


def sequential_gpt(c: GPTConfig, tied: bool = True, base_seed: int = 1234) -> tuple[nn.Sequential, Any]:
    """(the same layers as one ``nn.Sequential`` with the same initial values, the loss function)."""
    plan, loss = gpt_layer_plan(c, tp=1, tied=tied)
    return nn.Sequential(*build_layers(plan, base_seed=base_seed)), loss


def plain_loss(model: nn.Sequential, loss_fn: Any, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return loss_fn(model(tokens), targets)
