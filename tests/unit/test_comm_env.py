"""Reading the job's shape from each launcher's variables; the timeout setting."""

from datetime import timedelta

import pytest

from shardspeed.comm import comm_timeout, read_dist_env


def test_torchrun_and_ours():
    e = read_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (3, 4, 1, "h", 1234)


def test_openmpi_slurm_mpich_and_nothing():
    e = read_dist_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (1, 2, 1, "openmpi")
    e = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.source) == (5, 8, 1, "10.1.2.3", "slurm")
    e = read_dist_env({"PMI_RANK": "2", "PMI_SIZE": "3"})
    assert (e.rank, e.world_size, e.source) == (2, 3, "mpich")
    e = read_dist_env({})
    assert (e.rank, e.world_size, e.source) == (0, 1, "none")


def test_multi_host_openmpi_without_master_addr_says_what_to_set():
    with pytest.raises(ValueError, match="set MASTER_ADDR to the address of rank 0's host"):
        read_dist_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_bad_rank_variable_is_named():
    with pytest.raises(ValueError, match="environment variable RANK='x' is not an integer"):
        read_dist_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_comm_timeout(monkeypatch):
    monkeypatch.delenv("SHARDSPEED_COMM_TIMEOUT_S", raising=False)
    assert comm_timeout() == timedelta(minutes=10)
    monkeypatch.setenv("SHARDSPEED_COMM_TIMEOUT_S", "42")
    assert comm_timeout() == timedelta(seconds=42)
    monkeypatch.setenv("SHARDSPEED_COMM_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SHARDSPEED_COMM_TIMEOUT_S='soon' is not a number of seconds"):
        comm_timeout()
