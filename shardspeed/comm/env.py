"""Where this process sits in the job, read from the environment of whichever launcher started it:
ours or torchrun (RANK/WORLD_SIZE), Open MPI (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_*), Slurm
(SLURM_*). Nothing set means a single process with no launcher."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher's variables were read


DEFAULT_PORT = 29500


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_dist_env(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), int(env.get("LOCAL_RANK", 0)),
                       addr, port, "torchrun/shardspeed")
    if "OMPI_COMM_WORLD_RANK" in env:
        size = _int(env, "OMPI_COMM_WORLD_SIZE")
        if "MASTER_ADDR" not in env and int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", size)) != size:
            raise ValueError("Open MPI job across several hosts: set MASTER_ADDR to the address of rank 0's host "
                             "(e.g. mpirun -x MASTER_ADDR=host1 ...)")
        return DistEnv(_int(env, "OMPI_COMM_WORLD_RANK"), size,
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), addr, port, "openmpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return DistEnv(_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), int(env.get("MPI_LOCALRANKID", 0)),
                       addr, port, "mpich")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        return DistEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                       int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return DistEnv(0, 1, 0, addr, port, "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
