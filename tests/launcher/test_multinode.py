"""The multi-node launcher: the commands each runner builds, environment propagation, and node mode
run for real (two "nodes" on this machine, started by hand as --no_ssh --node_rank N)."""

import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import pytest

from shardspeed.launcher.hostfile import decode_world
from shardspeed.launcher.runners import (
    Job,
    env_to_export,
    mpich_command,
    node_spawner,
    openmpi_command,
    pdsh_command,
    read_env_file,
    slurm_command,
    ssh_commands,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(HERE, "scripts")


def _job(**kw):
    world = OrderedDict([("w0", [0, 1]), ("w1", [0, 1])])
    return Job(world=world, master_addr="10.0.0.1", master_port=29500, target="train.py", target_args=["--lr", "1"],
               env={"NCCL_DEBUG": "INFO"}, cwd="/job dir", python="/venv/bin/python", **kw)


def test_pdsh_starts_the_node_spawner_everywhere_with_its_rank():
    cmd = pdsh_command(_job(launcher_args=["-R", "ssh"]))
    assert cmd[:7] == ["pdsh", "-S", "-f", "1024", "-R", "ssh", "-w"] and cmd[7] == "w0,w1"
    remote = cmd[8]
    assert remote.startswith("export NCCL_DEBUG=INFO; cd '/job dir' && /venv/bin/python -u -m shardspeed.launcher")
    assert ("--no_ssh --watch_stdin --node_rank %n --world_info w0:0,1@w1:0,1 --master_addr 10.0.0.1 "
            "--master_port 29500") in remote
    assert remote.endswith("train.py --lr 1")


def test_ssh_runs_one_command_per_node():
    cmds = ssh_commands(_job(launcher_args=["-p", "2222"]))
    assert [c[:5] for c in cmds] == [["ssh", "-o", "BatchMode=yes", "-p", "2222"]] * 2
    assert [c[5] for c in cmds] == ["w0", "w1"]
    assert "--node_rank 0 " in cmds[0][6] and "--node_rank 1 " in cmds[1][6]


def test_node_spawner_flags():
    cmd = node_spawner(_job(module=True, no_local_rank=True), "3")
    assert cmd[-5:] == ["--module", "--no_local_rank", "train.py", "--lr", "1"]
    assert decode_world(cmd[cmd.index("--world_info") + 1]) == _job().world


def test_mpi_and_slurm_commands():
    job = _job()
    assert openmpi_command(job) == [
        "mpirun", "-n", "4", "--host", "w0:2,w1:2", "--map-by", "slot", "--bind-to", "none",
        "-x", "MASTER_ADDR=10.0.0.1", "-x", "MASTER_PORT=29500", "-x", "NCCL_DEBUG=INFO",
        "/venv/bin/python", "-u", "train.py", "--lr", "1"]
    assert mpich_command(job)[:7] == ["mpirun", "-n", "4", "-ppn", "2", "-hosts", "w0,w1"]
    assert ["-genv", "MASTER_PORT", "29500"] == mpich_command(job)[10:13]
    assert slurm_command(job)[:9] == ["srun", "-n", "4", "--nodes", "2", "--ntasks-per-node", "2", "--nodelist",
                                      "w0,w1"]
    assert slurm_command(job)[9] == "--export=ALL,MASTER_ADDR=10.0.0.1,MASTER_PORT=29500,NCCL_DEBUG=INFO"
    uneven = Job(world=OrderedDict([("w0", [0, 1]), ("w1", [0])]), master_addr="a", master_port=1, target="t",
                 target_args=[])
    with pytest.raises(ValueError, match="same number of ranks on every node; the selection has w0: 2, w1: 1"):
        mpich_command(uneven)


def test_environment_propagation(tmp_path):
    (tmp_path / ".shardspeed_env").write_text("# site settings\nHF_HOME=/data/hf\nGLOO_SOCKET_IFNAME = eth1\n")
    env = env_to_export({"NCCL_IB_DISABLE": "1", "PYTHONPATH": "/src", "HOME": "/root", "OMP_NUM_THREADS": "4"},
                        str(tmp_path), home=str(tmp_path / "none"))
    assert env == {"NCCL_IB_DISABLE": "1", "PYTHONPATH": "/src", "OMP_NUM_THREADS": "4", "HF_HOME": "/data/hf",
                   "GLOO_SOCKET_IFNAME": "eth1"}
    (tmp_path / "bad").write_text("OK=1\nnot a line\n")
    with pytest.raises(ValueError, match=r"bad:2: expected NAME=value, got 'not a line'"):
        read_env_file(str(tmp_path / "bad"))


def _node(rank, hostfile, port, *extra):
    return subprocess.Popen([sys.executable, "-m", "shardspeed.launcher", "--hostfile", str(hostfile), "--no_ssh",
                             "--node_rank", str(rank), "--master_port", str(port), *extra,
                             f"{SCRIPTS}/allreduce.py"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_nodes_started_by_hand_meet_in_one_job(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=2\nlocalhost slots=1  # the same machine under another name\n")
    nodes = [_node(r, hostfile, 29631, "--no_local_rank") for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n---\n".join(outs)  # whole, not a truncated repr
    assert "rank 0 of 3 local 0 sum 3" in outs[0] and "rank 1 of 3 local 1 sum 3" in outs[0]
    assert "rank 2 of 3 local 0 sum 3" in outs[1]


def _node_by_hand(rank, *flags):
    """torchrun's way: no hostfile, the same command on each node but its --node_rank."""
    return subprocess.Popen([sys.executable, "-m", "shardspeed.launcher", "--num_nodes", "2", "--node_rank", str(rank),
                             "--num_procs", "2", *flags, "--no_ssh", "--no_local_rank", f"{SCRIPTS}/allreduce.py"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_started_by_hand_without_a_hostfile_meet_in_one_job():
    from shardspeed.comm.env import free_port

    port = str(free_port())
    nodes = [_node_by_hand(r, "--master_addr", "127.0.0.1", "--master_port", port) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n---\n".join(outs)
    # node N runs global ranks 2N, 2N+1 with local ranks 0, 1; the sum of all four ranks is 6
    for node, out in enumerate(outs):
        for local in (0, 1):
            assert f"[rank {2 * node + local}] rank {2 * node + local} of 4 local {local} sum 6" in out, out


def test_nodes_by_hand_without_a_hostfile_need_master_addr_and_no_ssh():
    p = _node_by_hand(1)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2
    assert ("shardspeed: --num_nodes 2 --no_ssh without a hostfile: pass --master_addr, the address of node 0 that "
            "every node can reach, the same on every node (e.g. --master_addr 10.0.0.5)") in out
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--num_nodes", "2", "--num_procs", "2",
                        f"{SCRIPTS}/allreduce.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert ("shardspeed: --num_nodes 2 without --hostfile: either pass --hostfile (the nodes are started from here), "
            "or run this command on every node with --no_ssh --node_rank N --master_addr ADDR (N = 0..1, ADDR = "
            "node 0's address)") in p.stderr
    p = _node_by_hand(2, "--master_addr", "127.0.0.1")
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2 and "--node_rank 2: the selection has nodes 0-1" in out
    p = _node_by_hand(0, "--master_addr", "127.0.0.1", "--include", "localhost:0")
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2
    assert ("shardspeed: --include/--exclude select hosts and slots of a --hostfile; with --num_nodes 2 --no_ssh and "
            "no hostfile every node runs --num_procs ranks: drop them, or pass --hostfile") in out


def test_node_mode_errors(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\nb slots 2\n")
    p = _node(0, hostfile, 29632)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2 and f"{hostfile}:2: expected 'hostname slots=N', got 'b slots 2'" in out
    hostfile.write_text("a slots=1\n")
    p = _node(3, hostfile, 29632)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2 and "--node_rank 3: the selection has nodes 0-0 (a)" in out


def test_help_gives_an_example_for_every_flag():
    from shardspeed.launcher.cli import EXAMPLES, build_parser

    assert "shardspeed --num_nodes 2 --node_rank 1 --num_procs 4 --master_addr 10.0.0.5" in EXAMPLES
    for action in build_parser()._actions:
        if action.option_strings and action.help not in (None, "==SUPPRESS==") and "-h" not in action.option_strings:
            assert "e.g." in action.help, action.option_strings


@pytest.mark.skipif(not shutil.which("mpirun.openmpi"),
                    reason="mpirun.openmpi is not installed (make installs Debian's openmpi-bin where it can)")
def test_openmpi_runner_for_real():
    extra = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--force_multi", "--launcher", "openmpi",
                        "--num_procs", "2", "--master_port", "29656", "--launcher_args", extra, "--no_local_rank",
                        f"{SCRIPTS}/allreduce.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "openmpi: 1 node(s), 2 rank(s)" in out
    assert "rank 0 of 2 local 0 sum 1" in out and "rank 1 of 2 local 1 sum 1" in out


@pytest.mark.skipif(not shutil.which("mpirun.mpich"),
                    reason="MPICH's mpirun.mpich is not installed (make installs Debian's mpich where it can)")
def test_mpich_runner_for_real():
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--force_multi", "--launcher", "mpich",
                        "--num_procs", "2", "--master_port", "29657", "--no_local_rank",
                        f"{SCRIPTS}/allreduce.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "mpich: 1 node(s), 2 rank(s)" in out
    assert "rank 0 of 2 local 0 sum 1" in out and "rank 1 of 2 local 1 sum 1" in out
