"""init_distributed() from each launcher's environment, and the collective timeout."""

import time

import pytest

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.world_size(2)


def _openmpi_env(rank, world, port):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world),
            "MASTER_PORT": str(port)}


def _slurm_env(rank, world, port):
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(rank),
            "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _mpich_env(rank, world, port):
    return {"PMI_RANK": str(rank), "PMI_SIZE": str(world), "MPI_LOCALRANKID": str(rank), "MASTER_PORT": str(port)}


def _join(rank):
    import torch

    import shardspeed
    from shardspeed import comm

    env = shardspeed.init_distributed()
    t = torch.tensor([float(rank + 1)])
    comm.all_reduce(t)
    return {"rank": comm.get_rank(), "world": comm.get_world_size(), "sum": t.item(), "source": env.source,
            "local_rank": env.local_rank}


@pytest.mark.parametrize("env_fn, source", [(_openmpi_env, "openmpi"), (_slurm_env, "slurm"),
                                            (_mpich_env, "mpich")])
def test_init_from_launcher_environment(env_fn, source):
    results = run_ranks(_join, 2, env_fn=env_fn)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["source"] == source for r in results)
    assert [r["local_rank"] for r in results] == [0, 1]


def _late_peer(rank):
    import torch

    import shardspeed
    from shardspeed import comm

    shardspeed.init_distributed()
    if rank == 1:
        time.sleep(12)  # never joins the collective below in time
        return {}
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4))
    except Exception as e:  # gloo raises on timeout
        return {"elapsed": time.monotonic() - start, "error": str(e)}
    return {"elapsed": time.monotonic() - start, "error": ""}


def test_collective_timeout_comes_from_the_environment():
    r0, _ = run_ranks(_late_peer, 2, extra_env={"SHARDSPEED_COMM_TIMEOUT_S": "2"})
    assert r0["error"], "the all_reduce should have timed out"
    assert "timed out" in r0["error"].lower() or "timeout" in r0["error"].lower()
    assert r0["elapsed"] < 10
