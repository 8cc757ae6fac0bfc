"""The pdsh and ssh runners run for real against this machine: an sshd of the test's own (its own host
key, one authorized key, a free port on loopback) plays every node, under two names (127.0.0.1 and
localhost) so that a job has two nodes. Skips, saying why, where sshd/pdsh are missing or the test is
not root (sshd needs root to log a user in)."""

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from shardspeed.comm.env import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
SSHD = "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")) or os.geteuid() != 0,
    reason="needs Debian's openssh-server and openssh-client (make installs them where it can) and root")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-h", str(d / "host"),
                             "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={d / 'authorized_keys'}",
                             "-o", "StrictModes=no", "-o", "PidFile=none", "-o", "UsePAM=no",
                             "-o", "PermitRootLogin=prohibit-password", "-o", "MaxStartups=50"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    client = ["-i", str(d / "user"), "-p", str(port), "-o", "StrictHostKeyChecking=no",
              "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    for _ in range(100):
        if subprocess.run(["ssh", "-o", "BatchMode=yes", *client, "127.0.0.1", "true"]).returncode == 0:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the test's sshd did not accept a login: " + (d / "sshd.log").read_text())
    yield {"client": client, "dir": d}
    proc.terminate()
    proc.wait()


def _launch(sshd, tmp_path, launcher, script, *script_args, hostfile="127.0.0.1 slots=1\nlocalhost slots=1\n",
            extra=(), port=None):
    (tmp_path / "hosts").write_text(hostfile)
    env = {**os.environ, "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "1"}
    if launcher == "pdsh":  # pdsh runs ssh with its own arguments, then these
        env.update(PDSH_RCMD_TYPE="ssh", PDSH_SSH_ARGS_APPEND=" ".join(sshd["client"]))
        launcher_args = "-R ssh"
    else:
        launcher_args = " ".join(sshd["client"])
    cmd = [sys.executable, "-m", "shardspeed.launcher", "--hostfile", str(tmp_path / "hosts"), "--launcher", launcher,
           "--launcher_args", launcher_args, "--master_port", str(port or free_port()), "--no_local_rank", *extra,
           os.path.join(SCRIPTS, script), *script_args]
    # the launcher's working directory (with its .shardspeed_env) is where every node runs
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _leftovers(marker: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def _wait_gone(marker: str, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while (left := _leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("launcher", ["pdsh", "ssh"])
def test_job_over_remote_shells_meets_and_sees_its_environment(sshd, tmp_path, launcher):
    if launcher == "pdsh" and not shutil.which("pdsh"):
        pytest.skip("Debian's pdsh is not installed (make installs it where it can)")
    (tmp_path / ".shardspeed_env").write_text("SITE_SETTING=from-env-file\n")
    p = _launch(sshd, tmp_path, launcher, "allreduce.py",
                hostfile="127.0.0.1 slots=2\nlocalhost slots=1\n")
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert f"{launcher}: 2 node(s), 3 rank(s), master 127.0.0.1" in out
    for line in ("rank 0 of 3 local 0 sum 3", "rank 1 of 3 local 1 sum 3", "rank 2 of 3 local 0 sum 3"):
        assert line in out, out
    p = _launch(sshd, tmp_path, launcher, "env_probe.py", hostfile="127.0.0.1 slots=4\nlocalhost slots=2\n",
                extra=("--include", "127.0.0.1:1,3@localhost:1"))
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    # the selected slots are the devices a node's ranks see; NCCL_* and .shardspeed_env travel with the job
    assert ("probe RANK=0 LOCAL_RANK=0 WORLD_SIZE=3 CUDA_VISIBLE_DEVICES=1,3 NCCL_DEBUG=WARN "
            "SITE_SETTING=from-env-file") in out
    assert "probe RANK=1 LOCAL_RANK=1 WORLD_SIZE=3 CUDA_VISIBLE_DEVICES=1,3 NCCL_DEBUG=WARN" in out
    assert "probe RANK=2 LOCAL_RANK=0 WORLD_SIZE=3 CUDA_VISIBLE_DEVICES=1 NCCL_DEBUG=WARN" in out


@pytest.mark.parametrize("launcher", ["pdsh", "ssh"])
def test_a_failed_rank_stops_every_node(sshd, tmp_path, launcher):
    """Rank 1 (node 1) raises; rank 0 (node 0) sleeps and never talks to it: only the launchers can stop it."""
    if launcher == "pdsh" and not shutil.which("pdsh"):
        pytest.skip("Debian's pdsh is not installed (make installs it where it can)")
    marker = f"faulty.py raise-{launcher}"
    start = time.monotonic()
    p = _launch(sshd, tmp_path, launcher, "faulty.py", f"raise-{launcher}", "raise")
    out = p.communicate(timeout=60)[0]
    took = time.monotonic() - start
    assert p.returncode != 0, out
    assert "boom on rank 1" in out
    assert "[shardspeed] rank 1 on node 1 (localhost) exited with code 1; stopping every node" in out, out
    assert took < 30, out
    assert _wait_gone(marker, within=10) == [], out


@pytest.mark.parametrize("launcher", ["pdsh", "ssh"])
def test_stopping_the_launcher_stops_every_node(sshd, tmp_path, launcher):
    if launcher == "pdsh" and not shutil.which("pdsh"):
        pytest.skip("Debian's pdsh is not installed (make installs it where it can)")
    marker = f"faulty.py sleep-{launcher}"
    p = _launch(sshd, tmp_path, launcher, "faulty.py", f"sleep-{launcher}", "sleep")
    deadline = time.monotonic() + 60
    while len(_leftovers(marker)) < 2 and time.monotonic() < deadline:  # both ranks up
        time.sleep(0.2)
    assert len(_leftovers(marker)) >= 2
    p.send_signal(2)  # Ctrl-C
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0
    assert _wait_gone(marker, within=20) == [], out
