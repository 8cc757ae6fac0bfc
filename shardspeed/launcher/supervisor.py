"""Start local ranks, prefix their output, and take the job down together when one fails.

[Note: process groups] Each rank starts in its own session so that stopping it also stops whatever
it started (data-loader workers, compilers). The launcher forwards Ctrl-C (SIGINT) and SIGTERM to
every rank; a rank that does not exit within ``grace_s`` after SIGTERM gets SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO


@dataclass
class RankSpec:
    rank: int
    cmd: list[str]
    env: dict[str, str]


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
                 grace_s: float = 5.0, who: str = "shardspeed"):
        self.specs = list(specs)
        self.out = out or sys.stdout
        self.prefix = prefix
        self.grace_s = grace_s
        self.who = who
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []

    def say(self, msg: str) -> None:
        with self._lock:
            self.out.write(f"[{self.who}] {msg}\n")
            self.out.flush()

    def _pump(self, rank: int, stream: IO[bytes]) -> None:
        tag = f"[rank {rank}] " if self.prefix else ""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            with self._lock:
                self.out.write(tag + line if line.endswith("\n") else tag + line + "\n")
                self.out.flush()
        stream.close()

    def start(self) -> None:
        for spec in self.specs:
            p = subprocess.Popen(spec.cmd, env=spec.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
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
                for spec, p in zip(self.specs, self.procs, strict=True):
                    code = p.poll()
                    if code not in (None, 0):
                        self.say(f"rank {spec.rank} {_describe(code)}; stopping the other ranks")
                        self.stop_all()
                        self._join()
                        return _exit_code(code)
                if all(p.poll() == 0 for p in self.procs):
                    self._join()
                    return 0
                time.sleep(0.05)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _wait_or_kill(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self.stop_all()
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(timeout=2.0)
