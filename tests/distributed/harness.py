"""Run a function on N real ranks (processes) over gloo.

Each test gets a free port; a rank that raises fails the test with its traceback; a hung job is
killed after ``timeout`` seconds, after every live rank printed its stack (faulthandler on SIGUSR1).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _child(fn: Callable[..., Any], rank: int, env: dict[str, str], args: tuple, q: Any) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        q.put(("ok", rank, pickle.dumps(result)))  # by value: the rank exits
    except BaseException:
        q.put(("err", rank, traceback.format_exc()))
    finally:
        from shardspeed.comm import destroy

        try:
            destroy()
        except Exception:
            pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0,
              env_fn: Callable[[int, int, int], dict[str, str]] = launcher_env,
              extra_env: dict[str, str] | None = None) -> list[Any]:
    """``fn(rank, *args)`` on each rank; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = []
    for r in range(world_size):
        env = {**env_fn(r, world_size, port), **(extra_env or {})}
        p = ctx.Process(target=_child, args=(fn, r, env, args, q), daemon=True)
        p.start()
        procs.append(p)
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        try:
            status, rank, payload = q.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() > deadline and errors:
                for p in procs:
                    p.kill()
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(results))
                for p in procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(1.0)
                for p in procs:
                    p.kill()
                raise TimeoutError(f"ranks {missing} did not finish in {timeout:.0f} s (stacks above)") from None
            dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
            if dead and q.empty():
                for p in procs:
                    p.kill()
                raise RuntimeError(f"ranks {dead} died with exit codes {[procs[i].exitcode for i in dead]}") from None
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
            # one failing rank usually leaves the others waiting in a collective: stop them
            deadline = min(deadline, time.monotonic() + 10)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
