"""The local launcher, run as users run it: a real subprocess with real ranks."""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = os.path.join(HERE, "scripts")


def launch(*args, timeout=120):
    cmd = [sys.executable, "-m", "shardspeed.launcher", *args]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - start


def test_ranks_get_environment_and_local_rank():
    code, out, _ = launch("--num_procs", "2", "--master_port", "29611", f"{SCRIPTS}/report.py", "--x", "1")
    assert code == 0, out
    for r in (0, 1):
        assert (f"[rank {r}] env RANK={r} LOCAL_RANK={r} WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 "
                f"argv --local_rank={r} --x 1") in out


def test_no_local_rank_and_module_and_num_gpus_alias():
    code, out, _ = launch("--num_gpus", "2", "--no_local_rank", "--module", "tests.launcher.scripts.report")
    assert code == 0, out
    assert "[rank 1] env RANK=1" in out and "--local_rank" not in out


def test_a_rank_that_raises_stops_the_job_with_its_code():
    code, out, elapsed = launch("--num_procs", "3", f"{SCRIPTS}/faulty.py", "raise")
    assert code == 1
    assert "RuntimeError: boom on rank 1" in out
    assert "[shardspeed] rank 1 exited with code 1; stopping the other ranks" in out
    assert elapsed < 30  # the sleeping ranks were stopped, not waited for


def test_a_rank_that_dies_is_named():
    code, out, elapsed = launch("--num_procs", "2", f"{SCRIPTS}/faulty.py", "kill")
    assert code == 128 + 9
    assert "[shardspeed] rank 1 was killed by signal SIGKILL; stopping the other ranks" in out
    assert elapsed < 30


def test_ctrl_c_is_forwarded_to_every_rank():
    p = subprocess.Popen([sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", f"{SCRIPTS}/faulty.py",
                          "wait"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    ready = 0
    while ready < 2:
        line = p.stdout.readline()
        assert line, "launcher ended early"
        ready += "ready" in line
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130
    assert out.count("interrupted") == 2
    assert "received SIGINT; stopping all ranks" in out


def test_missing_script_is_named():
    code, out, _ = launch("--num_procs", "2", "no_such_train.py")
    assert code == 2 and f"training script not found: {ROOT}/no_such_train.py" in out


def test_an_executable_that_cannot_be_started_is_named():
    code, out, _ = launch("--num_procs", "2", "--no_python", "no_such_tool")
    assert code == 2 and "Traceback" not in out, out
    assert "shardspeed: cannot start rank 0: no_such_tool: No such file or directory" in out


def test_deepspeed_script_trains_on_two_ranks(tmp_path):
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
                               "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "steps_per_print": 1}))
    code, out, _ = launch("--num_procs", "2", f"{SCRIPTS}/ds_train.py", "--deepspeed", "--deepspeed_config",
                          str(cfg), "--steps", "3")
    assert code == 0, out
    sums = sorted(line.split("checksum ")[1] for line in out.splitlines() if "checksum" in line)
    assert len(sums) == 2 and sums[0] == sums[1] and sums[0].endswith("steps 3")
    assert "[rank 0] [shardspeed] step=3 loss=" in out


def test_a_hung_rank_ends_the_job_with_the_collective_and_the_missing_rank_named():
    env = {**os.environ, "SHARDSPEED_COMM_TIMEOUT_S": "4"}
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "--no_local_rank",
                        f"{SCRIPTS}/stall.py", "hang"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert time.monotonic() - start < 30, out
    assert "CollectiveError: all_reduce of 4 bytes on ranks [0, 1] failed on rank 0" in out, out
    assert "SHARDSPEED_COMM_TIMEOUT_S=4" in out
    assert "ranks [1] did not arrive (they had issued fewer collectives)" in out
    assert "[shardspeed] rank 0 exited with code 1; stopping the other ranks" in out


def test_a_rank_that_raises_after_joining_the_group_ends_the_job_at_once():
    # rank 0 waits in an all_reduce for rank 1, which leaves without the exit rendezvous (it used to
    # wait there 60 s for rank 0, and the launcher reported the failure a minute late)
    code, out, elapsed = launch("--num_procs", "2", "--no_local_rank", f"{SCRIPTS}/fail_after_init.py", "raise")
    assert code == 1, out
    assert elapsed < 10, out
    assert "Traceback (most recent call last)" in out and "ValueError: bad batch on rank 1" in out
    assert "[shardspeed] rank 1 exited with code 1; stopping the other ranks" in out


def test_a_rank_that_calls_sys_exit_with_an_error_ends_the_job_at_once():
    code, out, elapsed = launch("--num_procs", "2", "--no_local_rank", f"{SCRIPTS}/fail_after_init.py", "exit")
    assert code == 3, out
    assert elapsed < 10, out
    assert "[shardspeed] rank 1 exited with code 3; stopping the other ranks" in out


def test_a_clean_job_leaves_together_and_exits_0():
    code, out, elapsed = launch("--num_procs", "2", "--no_local_rank", f"{SCRIPTS}/fail_after_init.py", "clean")
    assert code == 0, out
    assert "[rank 0] rank 0 done sum 2" in out and "[rank 1] rank 1 done sum 2" in out
    assert elapsed < 30, out


def test_a_rank_waiting_at_exit_leaves_when_its_peer_fails():
    # no launcher to stop rank 0 (as under a plain mpirun): the failing rank's note in the store must
    # end rank 0's exit rendezvous, which otherwise waits 60 s for it
    from shardspeed.comm.env import free_port

    port, start = free_port(), time.monotonic()
    procs = [subprocess.Popen([sys.executable, f"{SCRIPTS}/fail_at_exit.py"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": ROOT, "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert time.monotonic() - start < 30, outs  # two torch imports on 2 busy cores; the rendezvous waits 60
    assert [p.returncode for p in procs] == [0, 1], outs
    assert "ValueError: bad batch on rank 1" in outs[1]
    assert ("shardspeed: rank 0 leaves without waiting for the other ranks: rank 1 failed "
            "(unhandled ValueError)") in outs[0], outs[0]
