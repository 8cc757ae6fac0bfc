"""Batch-size arithmetic: train = micro * accumulation * data-parallel world size."""

from __future__ import annotations

from dataclasses import dataclass

from shardspeed.config.errors import ConfigError


@dataclass(frozen=True)
class BatchSizes:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int


def _mismatch(train: int, micro: int, gas: int, world: int) -> ConfigError:
    return ConfigError(
        f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} * "
        f"gradient_accumulation_steps {gas} * data-parallel world size {world}"
    )


def resolve_batch_sizes(
    train: int | None, micro: int | None, gas: int | None, world_size: int
) -> BatchSizes:
    """Fill in the missing one of the three sizes (any two give the third) and check they agree.

    With only one of them given, gradient accumulation defaults to 1, as in DeepSpeed.
    """
    for key, value in (
        ("train_batch_size", train),
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", gas),
    ):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value}")
    if train is None and micro is None:
        raise ConfigError(
            "set train_batch_size or train_micro_batch_size_per_gpu (or both) in the config; "
            "neither was given"
        )
    if train is not None and micro is not None and gas is not None:
        pass
    elif train is not None and micro is not None:
        gas, rem = divmod(train, micro * world_size)
        if rem or gas == 0:
            raise ConfigError(
                f"train_batch_size {train} is not divisible by train_micro_batch_size_per_gpu {micro} * "
                f"data-parallel world size {world_size}: no whole gradient_accumulation_steps fits"
            )
    elif train is not None:
        gas = gas or 1
        micro, rem = divmod(train, gas * world_size)
        if rem or micro == 0:
            raise ConfigError(
                f"train_batch_size {train} is not divisible by gradient_accumulation_steps {gas} * "
                f"data-parallel world size {world_size}: no whole train_micro_batch_size_per_gpu fits"
            )
    else:
        assert micro is not None
        gas = gas or 1
        train = micro * gas * world_size
    assert train is not None and micro is not None and gas is not None
    if train != micro * gas * world_size:
        raise _mismatch(train, micro, gas, world_size)
    return BatchSizes(train, micro, gas)
