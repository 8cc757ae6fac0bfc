"""The slurm runner run for real: a one-node Slurm cluster of the test's own (slurmctld and slurmd
on this machine, its own ports, state and spool in a temporary folder, no authentication daemon),
and ``shardspeed --launcher slurm`` starting the ranks through srun. Skips, saying why, where
Debian's slurm-wlm is missing or the test is not root (slurmd starts jobs as their user)."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from shardspeed.comm.env import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(HERE, "scripts")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("slurmctld", "slurmd", "srun", "sinfo")) or os.geteuid() != 0,
    reason="needs Debian's slurm-wlm (make installs it where it can) and root")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]  # slurmd finds its NodeName by the short hostname
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=shardspeedtest", f"SlurmctldHost={node}", "AuthType=auth/none", "CredType=cred/none",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'ctld.pid'}", f"SlurmdPidFile={d / 'd.pid'}",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "ReturnToService=2", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"NodeName={node} CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([daemon, "-D", "-c", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(d / f"{daemon}.log", "w")) for daemon in ("slurmctld", "slurmd")]
    try:
        for _ in range(150):
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix"):
                break
            time.sleep(0.2)
        else:
            logs = "".join((d / f"{n}.log").read_text() for n in ("slurmctld", "slurmd"))
            pytest.fail(f"the test's Slurm cluster did not come up (sinfo: {out!r}):\n{logs}")
        yield {"env": env, "node": node}
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_slurm_runner_for_real(slurm, tmp_path):
    (tmp_path / "hosts").write_text(f"{slurm['node']} slots=2\n")
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--hostfile", str(tmp_path / "hosts"),
                        "--launcher", "slurm", "--master_port", str(free_port()), "--no_local_rank",
                        f"{SCRIPTS}/allreduce.py"], cwd=ROOT, env={**slurm["env"], "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "slurm: 1 node(s), 2 rank(s)" in out
    # ranks, world size and local ranks come from srun's environment (comm/env.py)
    assert "rank 0 of 2 local 0 sum 1" in out and "rank 1 of 2 local 1 sum 1" in out
