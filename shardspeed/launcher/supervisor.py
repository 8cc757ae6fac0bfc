"""Start local ranks, prefix their output, and take the job down together when one fails.

[Note: process groups] Each rank starts in its own session so that stopping it also stops whatever
it started (data-loader workers, compilers). The launcher forwards Ctrl-C (SIGINT) and SIGTERM to
every rank; a rank that does not exit within ``grace_s`` after SIGTERM gets SIGKILL.

[Note: remote nodes] The multi-node launcher supervises pdsh/ssh clients instead of ranks. Their
output is watched for a node's report of a failed rank (``watch``), which takes the job down at once
even while the failed node's client is still running; a node launcher started that way stops its
ranks when its stdin closes, which is what sshd does when the client that started it goes away
(``abort`` from a thread).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO


class LaunchError(RuntimeError):
    """A rank or a runner's tool that cannot be started; the message says which and why."""


@dataclass
class RankSpec:
    rank: int
    cmd: list[str]
    env: dict[str, str]
    label: str = ""  # how messages name it; "rank N" unless set (a node's client: "node 1 (host)")
    keep_stdin: bool = False  # an open pipe instead of /dev/null: ssh sends EOF to the remote side otherwise

    def name(self) -> str:
        return self.label or f"rank {self.rank}"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class Supervisor:
    def __init__(self, specs: Sequence[RankSpec], out: IO[str] | None = None, prefix: bool = True,
                 grace_s: float = 5.0, who: str = "shardspeed", watch: Callable[[str], str | None] | None = None):
        self.specs = list(specs)
        self.out = out or sys.stdout
        self.prefix = prefix
        self.grace_s = grace_s
        self.who = who
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self.watch = watch  # line -> a failure it reports (or None)
        self._abort: str | None = None

    def abort(self, reason: str) -> None:
        """Take the job down from another thread; ``wait`` returns 1 after saying ``reason``."""
        if self._abort is None:
            self._abort = reason

    def _write(self, text: str) -> None:
        # Output is best effort: a node launcher whose ssh connection is gone writes into a closed pipe,
        # and must still stop its ranks.
        with self._lock:
            try:
                self.out.write(text)
                self.out.flush()
            except (OSError, ValueError):
                pass

    def say(self, msg: str) -> None:
        self._write(f"[{self.who}] {msg}\n")

    def _pump(self, rank: int, stream: IO[bytes]) -> None:
        tag = f"[rank {rank}] " if self.prefix else ""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            if self.watch is not None and (failure := self.watch(line)) is not None:
                self.abort(failure)
            self._write(tag + line if line.endswith("\n") else tag + line + "\n")
        stream.close()

    def start(self) -> None:
        for spec in self.specs:
            try:
                p = subprocess.Popen(spec.cmd, env=spec.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE if spec.keep_stdin else subprocess.DEVNULL,
                                     start_new_session=True)
            except OSError as e:  # not installed, not executable: the ones already started must not linger
                self.stop_all()
                raise LaunchError(f"cannot start {spec.name()}: {spec.cmd[0]}: {e.strerror}") from None
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(spec.rank, p.stdout), daemon=True)
            t.start()
            self._threads.append(t)

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        """SIGTERM every live rank, then SIGKILL whatever is left after the grace period."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()
            if p.stdin is not None:
                p.stdin.close()

    def wait(self) -> int:
        """Block until every rank succeeded (0) or one failed (its exit code, after stopping the rest)."""
        interrupted: list[int] = []

        def forward(signum: int, _frame: object) -> None:
            interrupted.append(signum)
            self._signal_all(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                if interrupted:
                    self.say(f"received {signal.Signals(interrupted[0]).name}; stopping all ranks")
                    self._wait_or_kill()
                    return 128 + interrupted[0]
                if self._abort is not None:
                    self.say(f"{self._abort}; stopping {self._everything}")
                    self.stop_all()
                    self._join()
                    return 1
                for spec, p, pump in zip(self.specs, self.procs, self._threads, strict=True):
                    code = p.poll()
                    if code not in (None, 0):
                        pump.join(timeout=1.0)  # a node's own report of which rank failed may still be in the pipe
                        what = self._abort or f"{spec.name()} {_describe(code)}"
                        self.say(f"{what}; stopping {self._everything}")
                        self.stop_all()
                        self._join()
                        return _exit_code(code)
                if all(p.poll() == 0 for p in self.procs):
                    self._join()
                    return 0
                time.sleep(0.05)
        except BaseException:  # never leave ranks behind: they run in sessions of their own
            self.stop_all()
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @property
    def _everything(self) -> str:
        return "every node" if self.watch is not None else "the other ranks"

    def _wait_or_kill(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self.stop_all()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(timeout=2.0)
