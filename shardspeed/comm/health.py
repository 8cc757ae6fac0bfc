"""Knowing which ranks are alive, so that a collective that fails says who is missing.

[Note: heartbeat] Each rank of a multi-rank job runs a daemon thread that writes
``shardspeed/heartbeat/<rank>`` = ``<unix time> <collectives issued>`` into the rendezvous store
every ``HEARTBEAT_S`` seconds (one small TCP write, nothing on the collective path). When a
collective fails (gloo/NCCL timeout after SHARDSPEED_COMM_TIMEOUT_S, or a peer's connection
closed), ``CollectiveError`` names the collective and lists the ranks that had issued fewer
collectives than this one (they never arrived at it) and the ranks whose heartbeat went silent
(dead, hung in native code, or cut off). If the store itself is unreachable, the message says
so: this rank has lost its link to rank 0's host.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

HEARTBEAT_S = 2.0
_KEY = "shardspeed/heartbeat/"
_state = {"issued": 0, "failed": False}
_thread: _Heartbeat | None = None


class CollectiveError(RuntimeError):
    """A collective that timed out or lost a peer; the message names it and the missing ranks."""


def count_issued() -> int:
    _state["issued"] += 1
    return _state["issued"]


def has_failed() -> bool:
    return _state["failed"]


class _Heartbeat(threading.Thread):
    def __init__(self, store: Any, rank: int):
        super().__init__(name="shardspeed-heartbeat", daemon=True)
        self.store, self.rank = store, rank
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.store.set(f"{_KEY}{self.rank}", f"{time.time():.3f} {_state['issued']}")
            except Exception:  # the store is gone (job ending, link cut): the failure report says so
                pass
            self.stop.wait(HEARTBEAT_S)


def start_heartbeat() -> None:
    global _thread
    if _thread is not None or dist.get_world_size() == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    _thread = _Heartbeat(store, dist.get_rank())
    _thread.start()


def stop_heartbeat() -> None:
    """Before the process group (and its store) is destroyed: a store write racing the teardown
    aborts the process (SIGABRT from C++)."""
    global _thread
    if _thread is not None:
        _thread.stop.set()
        _thread.join(timeout=HEARTBEAT_S + 3.0)
        _thread = None


_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                  "connection refused", "no route", "socket", "peer")


def is_comm_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _FAILURE_WORDS)


def explain(op: str, nbytes: int, group: Any, error: BaseException) -> CollectiveError:
    """The error a user reads when ``op`` failed on ``group``."""
    _state["failed"] = True
    me = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    limit = os.environ.get("SHARDSPEED_COMM_TIMEOUT_S", "600")
    head = (f"{op} of {nbytes} bytes on ranks {ranks} failed on rank {me} (collective #{_state['issued']} of this "
            f"rank; SHARDSPEED_COMM_TIMEOUT_S={limit}): {str(error).splitlines()[0][:200]}")
    found = within(5.0, lambda: _who_is_missing(ranks, me))
    if isinstance(found, BaseException) or found is None:
        why = type(found).__name__ if found is not None else "no answer in 5 s"
        return CollectiveError(f"{head}. The rendezvous store on rank 0's host cannot be reached either "
                               f"({why}): this rank has lost its link to the job")
    behind, silent = found
    parts = []
    if behind:
        parts.append(f"ranks {behind} did not arrive (they had issued fewer collectives)")
    if silent:
        parts.append(f"ranks {silent} stopped sending heartbeats (dead, hung or cut off)")
    return CollectiveError(f"{head}. " + ("; ".join(parts) if parts else "every rank was alive and had arrived: "
                                          "a network problem between them"))


_exits = [0]  # one exit rendezvous per process group this process joined


def _exit_key() -> str:
    return f"shardspeed/exit/{_exits[0] + 1}"


# [Note: leaving on failure] A rank that leaves because of an unhandled exception or a non-zero
# ``sys.exit`` must not wait in the exit rendezvous: its peers are usually blocked in a collective
# it will never join, so it would wait out the whole rendezvous timeout, and the launcher would
# report the failure a minute late. Python does not tell atexit handlers why the interpreter is
# ending, so we record it as it happens:
# - an unhandled exception: a ``sys.excepthook`` chained in front of the current one (torch's, which
#   prefixes ``[rankN]:``), and ``sys.last_value``, which the interpreter sets before calling any
#   hook, for scripts that install their own hook later (rich.traceback.install(), for one);
# - ``sys.exit(n)``, n non-zero: ``SystemExit`` never reaches excepthook and nothing is left set at
#   atexit time (checked on 3.11), so ``sys.exit`` itself is wrapped. ``raise SystemExit(n)`` and the
#   ``exit()`` builtin bypass it; such a rank falls back to the rendezvous, where it still leaves
#   early once a failed peer has written the failed key (below), else after the timeout.
# An exception in another thread does not end the process, so threading.excepthook is left alone.
# The failing rank writes ``<exit key>/failed`` = "<rank> <why>" so that peers already waiting in
# the rendezvous stop waiting for it.
# why this process is leaving on failure, and when it was recorded. A ``sys.exit(n)`` counts only from
# the main thread and only if the interpreter ends within _EXIT_RECENT_S of it: a script that catches
# its own SystemExit (``try: parser.parse_args() except SystemExit``) and trains on is not failing.
_leaving: list[tuple[str, float | None]] = []
_EXIT_RECENT_S = 5.0
_hooks_installed = [False]


def record_failures() -> None:
    """Chain ``sys.excepthook`` and wrap ``sys.exit`` so that exit knows this rank is failing."""
    if _hooks_installed[0]:
        return
    _hooks_installed[0] = True
    previous_hook, real_exit = sys.excepthook, sys.exit

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        _leaving.append((f"unhandled {kind.__name__}", None))
        previous_hook(kind, value, tb)

    def exit_recording(status: object = None) -> None:
        if status is not None and status != 0:
            if threading.current_thread() is threading.main_thread():
                _leaving.append((f"sys.exit({status!r})", time.monotonic()))
        real_exit(status)

    sys.excepthook, sys.exit = hook, exit_recording


def leaving_on_failure() -> str | None:
    """Why this process is ending on a failure (see Note: leaving on failure), or None."""
    for why, when in _leaving:
        if when is None or time.monotonic() - when < _EXIT_RECENT_S:
            return why
    value = getattr(sys, "last_value", None)
    return f"unhandled {type(value).__name__}" if value is not None else None


def announce_failure(why: str) -> None:
    """Tell peers waiting in the exit rendezvous that this rank will not come (bounded: the store's
    host may be gone)."""
    key, me = f"{_exit_key()}/failed", dist.get_rank()
    within(2.0, lambda: dist.distributed_c10d._get_default_store().set(key, f"{me} {why}"))


def leave_together(timeout_s: float = 60.0) -> bool:
    """Wait until every rank has reached exit, through the rendezvous store, not a collective.
    True when they all did; False when a peer announced a failure or ``timeout_s`` ran out.

    [Note: why not dist.barrier() at exit] gloo's barrier holds the operations still in flight when
    it was issued and drops them on its worker thread *after* the Python caller has moved on. If
    the interpreter is finalising by then, dropping a tensor that has a Python object needs the GIL,
    the thread is made to exit, and the process aborts ("terminate called without an active
    exception", seen here in about 1 run in 20 at the end of a clean job; core dump:
    ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit)."""
    key = _exit_key()
    _exits[0] += 1
    world = dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world:
            if store.check([f"{key}/failed"]):
                rank, why = store.get(f"{key}/failed").decode().split(" ", 1)
                print(f"shardspeed: rank {dist.get_rank()} leaves without waiting for the other ranks: "
                      f"rank {rank} failed ({why})", file=sys.stderr, flush=True)
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    except Exception:  # rank 0 (the store's host) already left: everyone had arrived
        pass
    return True


def within(seconds: float, fn: Any) -> Any:
    """``fn()`` in a daemon thread: its result or exception, or None if it did not return in time
    (a store read over a dead link can block in the kernel far beyond any store timeout)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box.append(e)

    t = threading.Thread(target=run, name="shardspeed-health", daemon=True)
    t.start()
    t.join(seconds)
    return box[0] if box else None


def _who_is_missing(ranks: list[int], me: int) -> tuple[list[int], list[int]]:
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=5))
    store.check([f"{_KEY}{me}"])  # raises when the store is unreachable
    now, mine = time.time(), _state["issued"]
    behind, silent = [], []
    for r in ranks:
        if r == me:
            continue
        key = f"{_KEY}{r}"
        if not store.check([key]):
            silent.append(r)
            continue
        stamp, issued = store.get(key).decode().split()
        if now - float(stamp) > 3 * HEARTBEAT_S:
            silent.append(r)
        elif int(issued) < mine:
            behind.append(r)
    return behind, silent
