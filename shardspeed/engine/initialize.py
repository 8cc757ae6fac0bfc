"""The public entry points: ``initialize()`` and ``add_config_arguments()``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from shardspeed.activation import checkpointing
from shardspeed.comm import get_model_parallel_unit, init_distributed, initialize_model_parallel, topology_from_mpu
from shardspeed.config import ConfigError, config_from_args
from shardspeed.engine.engine import ShardspeedEngine
from shardspeed.engine.pipe_engine import PipelineEngine
from shardspeed.pipe import PipelineModule
from shardspeed.tensor_parallel.autotp import autotp_from_config

log = logging.getLogger("shardspeed")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[shardspeed] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None,
               mpu: Any = None, dist_init_required: bool | None = None, collate_fn: Any = None,
               config: Any = None, config_params: Any = None) -> tuple[ShardspeedEngine, Any, Any, Any]:
    """Wrap ``model`` for distributed, mixed-precision training.

    Args:
        args: parsed arguments; ``args.deepspeed_config`` names the JSON config when ``config`` is not given.
        model: the ``torch.nn.Module`` to train.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or a callable
            ``params -> optimizer``; otherwise the config's ``optimizer`` section builds one.
        model_parameters: the parameters (or param-group dicts) to optimize; default: all trainable ones.
        training_data: a ``torch.utils.data.Dataset``; a loader over this rank's shard is returned.
        lr_scheduler: a scheduler, or a callable ``optimizer -> scheduler``; otherwise from the config.
        mpu: a model-parallel unit with ``get_data_parallel_group()`` and ``get_model_parallel_group()``;
            default: the one ``shardspeed.initialize_model_parallel()`` made, if any.
        collate_fn: passed to the returned data loader.
        config: a path to a JSON config or a dict (``config_params`` is accepted as an alias).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)``
    """
    if model is None:
        raise ValueError("initialize() needs a model: initialize(model=my_module, ...)")
    _setup_logging()
    cfg = config_from_args(args, config if config is not None else config_params)
    env = init_distributed()
    if isinstance(model, PipelineModule):
        return _initialize_pipeline(cfg, model, env.local_rank, mpu, optimizer=optimizer,
                                    model_parameters=model_parameters, lr_scheduler=lr_scheduler,
                                    training_data=training_data, collate_fn=collate_fn)
    if mpu is None:  # the unit initialize_model_parallel() made is the job's, as Megatron's parallel_state
        mpu = get_model_parallel_unit()
    autotp_size = cfg.tensor_parallel.autotp_size
    if autotp_size > 1 and mpu is None:
        mpu = initialize_model_parallel(tensor_parallel_size=autotp_size)
    topo = topology_from_mpu(mpu)
    # sliced before the engine is built: ZeRO partitions and the optimizer see this rank's slices
    model = autotp_from_config(model, cfg.tensor_parallel, topo.tp_group, optimizer, model_parameters)
    if "activation_checkpointing" in cfg.model_fields_set:  # as Megatron's configure(mpu, deepspeed_config=...)
        checkpointing.configure(mpu, deepspeed_config=cfg)
    engine = ShardspeedEngine(model, cfg, topo, local_rank=env.local_rank, optimizer=optimizer,
                              model_parameters=model_parameters, lr_scheduler=lr_scheduler,
                              training_data=training_data, collate_fn=collate_fn)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _initialize_pipeline(cfg: Any, model: PipelineModule, local_rank: int, mpu: Any,
                         **kwargs: Any) -> tuple[PipelineEngine, Any, Any, Any]:
    """A PipelineModule's engine: its topology's model-parallel unit (pipe x data x tensor groups)."""
    if cfg.tensor_parallel.autotp_size > 1:
        raise ConfigError("tensor_parallel.autotp_size slices a plain model; a PipelineModule's layers are "
                          "sliced by building them from tensor-parallel layers (shardspeed.tensor_parallel)")
    mpu = mpu or model.mpu()
    if "activation_checkpointing" in cfg.model_fields_set:
        checkpointing.configure(mpu, deepspeed_config=cfg)
    engine = PipelineEngine(model, cfg, topology_from_mpu(mpu), mpu, local_rank=local_rank, **kwargs)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--deepspeed`` and ``--deepspeed_config`` (and ``--local_rank``, which launchers pass)."""
    group = parser.add_argument_group("shardspeed", "shardspeed configuration")
    group.add_argument("--deepspeed", "--shardspeed", dest="deepspeed", default=False, action="store_true",
                       help="enable shardspeed (kept for DeepSpeed scripts)")
    group.add_argument("--deepspeed_config", "--shardspeed_config", dest="deepspeed_config", default=None,
                       type=str, help="path to the JSON config")
    if not any("--local_rank" in a.option_strings for a in parser._actions):
        group.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                           help="local rank, passed by the launcher")
    return parser
