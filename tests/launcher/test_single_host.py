"""A hostfile whose only selected host is this machine runs here, without pdsh or ssh; a runner whose
tool is not installed says which tool, how to get it, and which launchers would work instead."""

import os
import socket
import subprocess
import sys

from shardspeed.launcher.multinode import is_this_machine
from shardspeed.launcher.runners import missing_tool

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(HERE, "scripts")


def launch(tmp_path, hostfile, *args):
    """The launcher with an empty PATH: pdsh, ssh, mpirun and srun are all missing (ranks start from
    sys.executable, so they do not need PATH)."""
    (tmp_path / "hosts").write_text(hostfile)
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--hostfile", str(tmp_path / "hosts"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": str(tmp_path / "no-tools")})
    return p.returncode, p.stdout + p.stderr


def test_this_machine_under_its_names():
    me = socket.gethostname()
    for host in ("localhost", "127.0.0.1", "127.0.1.1", me, me.split(".")[0]):
        assert is_this_machine(host), host
    assert not is_this_machine("no-such-host.invalid")
    assert not is_this_machine("192.0.2.1")  # TEST-NET-1: nobody's address


def test_a_hostfile_of_this_machine_runs_here_on_the_selected_slots(tmp_path):
    code, out = launch(tmp_path, "localhost slots=4\n", "--include", "localhost:1,3", "--no_local_rank",
                       f"{SCRIPTS}/env_probe.py")
    assert code == 0, out
    assert "localhost is this machine: starting its 2 selected slot(s) here, without pdsh" in out
    for r in (0, 1):
        assert f"[rank {r}] probe RANK={r} LOCAL_RANK={r} WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=1,3" in out


def test_this_machine_by_hostname_after_exclude_runs_here_and_ranks_meet(tmp_path):
    me = socket.gethostname()
    code, out = launch(tmp_path, f"{me} slots=2\nworker-9 slots=2\n", "--exclude", "worker-9", "--no_local_rank",
                       f"{SCRIPTS}/allreduce.py")
    assert code == 0, out
    assert f"{me} is this machine" in out
    assert "rank 0 of 2 local 0 sum 1" in out and "rank 1 of 2 local 1 sum 1" in out


def test_two_hosts_without_pdsh_say_what_to_install(tmp_path):
    code, out = launch(tmp_path, "127.0.0.1 slots=1\nlocalhost slots=1\n", f"{SCRIPTS}/env_probe.py")
    assert code == 2, out
    assert "Traceback" not in out
    assert ("shardspeed: --launcher pdsh runs 'pdsh', which is not installed on this machine (not on PATH). "
            "Install it (apt-get install pdsh) or choose another --launcher") in out


def test_each_missing_tool_is_named_with_the_launchers_that_would_work():
    have = {"ssh", "mpirun.openmpi"}

    def which(name):
        return f"/usr/bin/{name}" if name in have else None

    msg = missing_tool("pdsh", "pdsh", which)
    assert msg.startswith("--launcher pdsh runs 'pdsh', which is not installed on this machine")
    assert "(apt-get install pdsh)" in msg and "found on this machine: --launcher ssh, --launcher openmpi" in msg
    assert "(apt-get install slurm-client, and run inside the Slurm cluster)" in missing_tool("slurm", "srun", which)
    assert "(apt-get install mpich)" in missing_tool("mpich", "mpirun", which)
    assert missing_tool("ssh", "ssh", which) is None
