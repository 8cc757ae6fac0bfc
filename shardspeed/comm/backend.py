"""Process-group lifetime: the one place that starts and queries torch.distributed.

[Note: single process] ``initialize()`` must work in a plain ``python train.py`` with no launcher.
Then we start a one-rank gloo group on an in-memory store, so the rest of the library never
branches on "is distributed initialised"; collectives on a one-rank group return at once
(see collectives.py).
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from shardspeed.accelerator import get_accelerator
from shardspeed.comm import health
from shardspeed.comm.env import DistEnv, read_dist_env

log = logging.getLogger("shardspeed")

ProcessGroup = Any  # torch's ProcessGroup; kept opaque above this layer
DEFAULT_TIMEOUT_S = 600.0


def comm_timeout() -> timedelta:
    """SHARDSPEED_COMM_TIMEOUT_S (default 10 minutes, not torch's 30) bounds every collective."""
    raw = os.environ.get("SHARDSPEED_COMM_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"SHARDSPEED_COMM_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"SHARDSPEED_COMM_TIMEOUT_S={raw!r} must be positive")
    return timedelta(seconds=seconds)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    dist_backend: str | None = None,
    timeout: timedelta | None = None,
    init_method: str | None = None,
    rank: int = -1,
    world_size: int = -1,
    **_ignored: Any,
) -> DistEnv:
    """Join (or start) the default process group from the launcher's environment.

    Reads our launcher's and torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``,
    Open MPI's ``OMPI_COMM_WORLD_*``, MPICH's ``PMI_*`` or Slurm's ``SLURM_*``. With none of them
    it starts a one-process group. Backend: gloo on CPU, NCCL on CUDA, unless ``dist_backend``
    names one. Calling it again once initialised is a no-op.
    """
    env = read_dist_env()
    if rank >= 0 or world_size > 0:
        env = DistEnv(rank if rank >= 0 else env.rank, world_size if world_size > 0 else env.world_size,
                      env.local_rank, env.master_addr, env.master_port, "arguments")
    if is_initialized():
        return env
    accel = get_accelerator()
    backend = dist_backend or accel.dist_backend
    atexit.register(_leave_at_exit)
    timeout = timeout or comm_timeout()
    accel.set_device(env.local_rank)
    if env.world_size == 1 and init_method is None and env.source == "none":
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return env
    # Export what torch's env:// rendezvous reads, so MPI and Slurm jobs need no extra variables.
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    health.start_heartbeat()
    health.record_failures()  # after init_process_group, whose own excepthook ours chains
    if env.rank == 0:
        log.info("initialised %s process group: %d ranks (from %s)", backend, env.world_size, env.source)
    return env


def _leave_at_exit() -> None:
    """Leave together, then tear the group down before the interpreter does. Seen here: a rank that
    finalises while its peer still holds the connection aborts ("terminate called without an active
    exception", SIGABRT) after an otherwise clean run."""
    if not is_initialized():
        return
    health.stop_heartbeat()
    if health.has_failed():  # nobody would come to a barrier, and teardown can block on a dead link
        health.within(5.0, destroy)
        return
    if dist.get_world_size() > 1:
        why = health.leaving_on_failure()
        if why is not None:  # peers wait in a collective for us: health.py, Note: leaving on failure
            health.announce_failure(why)
            # No destroy: it closes the links at once, the peers' collectives fail, and a peer's own
            # exit could reach the launcher before ours, which would then name the wrong rank. Left
            # open, the links close when this process is gone (30 of 30 runs: this rank named, with
            # its own exit code, no abort).
            return
        # not dist.barrier(): health.py, Note: why not dist.barrier() at exit
        if not health.leave_together():  # a peer failed or never came: teardown may block on it
            health.within(5.0, destroy)
            return
    destroy()


def destroy() -> None:
    # the model-parallel unit's groups die with the default group: forget it, or a later
    # initialize_model_parallel() would hand back dead groups
    from shardspeed.comm import model_parallel

    model_parallel.forget_model_parallel()
    if is_initialized():
        dist.destroy_process_group()


def destroy_group(group: ProcessGroup) -> None:
    """Release one group made by ``new_group`` (not the default one)."""
    if is_initialized() and group is not None and group is not dist.group.WORLD:
        dist.destroy_process_group(group)


def get_rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def get_global_rank(group: ProcessGroup, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)


def new_group(ranks: list[int]) -> ProcessGroup:
    return dist.new_group(ranks=ranks, timeout=comm_timeout())


def world_group() -> ProcessGroup:
    return dist.group.WORLD


def monitored_barrier(what: str, timeout_s: float, group: ProcessGroup | None = None) -> None:
    """A barrier that names the ranks that did not arrive within ``timeout_s`` (gloo), instead of
    waiting for the collective timeout. ``what`` is the operation, for the message."""
    if get_world_size(group) == 1:
        return
    if dist.get_backend(group) != "gloo":
        dist.barrier(group=group)
        return
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise RuntimeError(f"{what} must be called by every rank, but some did not arrive within {timeout_s:g} s "
                           f"({e})") from None


def barrier(group: ProcessGroup | None = None) -> None:
    if get_world_size(group) > 1:
        dist.barrier(group=group)
