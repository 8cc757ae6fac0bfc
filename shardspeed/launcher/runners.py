"""The command each multi-node launcher runs. Pure functions: they build argument lists, the CLI runs
them.

- ``pdsh`` / ``ssh``: start this launcher on every node in node mode (``--no_ssh --node_rank N
  --world_info W``), which then starts that node's ranks; the first node's address is the master.
- ``openmpi`` / ``mpich`` / ``slurm``: the tool itself starts every rank; ranks read their rank and
  world size from the tool's environment (see comm/env.py), MASTER_ADDR/PORT are exported.

[Note: environment] Every node gets the variables whose names start with ``NCCL_`` or ``PYTHON``,
``OMP_NUM_THREADS`` if set, and every ``NAME=value`` line of a ``.shardspeed_env`` file (in the
working directory, else the home directory; ``#`` comments allowed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

EXPORT_PREFIXES = ("NCCL_", "PYTHON")
ENV_FILE = ".shardspeed_env"


@dataclass
class Job:
    world: OrderedDict[str, list[int]]  # host -> slots, in node-rank order
    master_addr: str
    master_port: int
    target: str
    target_args: list[str]
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    launcher_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what every node must see
    cwd: str = field(default_factory=os.getcwd)
    python: str = sys.executable

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.world.values())


def env_to_export(environ: dict[str, str], cwd: str, home: str | None = None) -> dict[str, str]:
    out = {k: v for k, v in environ.items() if k.startswith(EXPORT_PREFIXES)}
    if "OMP_NUM_THREADS" in environ:
        out["OMP_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
    for folder in (cwd, home if home is not None else os.path.expanduser("~")):
        path = os.path.join(folder, ENV_FILE)
        if os.path.isfile(path):
            out.update(read_env_file(path))
            break
    return out


def read_env_file(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, eq, value = line.partition("=")
            if not eq or not name.strip().isidentifier():
                raise ValueError(f"{path}:{number}: expected NAME=value, got {raw.strip()!r}")
            out[name.strip()] = value.strip()
    return out


def _target(job: Job) -> list[str]:
    if job.no_python:
        return [job.target, *job.target_args]
    return [job.python, "-u", *(["-m"] if job.module else []), job.target, *job.target_args]


def node_spawner(job: Job, node_rank: str) -> list[str]:
    """This launcher in node mode, started on one node (``node_rank`` may be pdsh's ``%n``); it stops
    its ranks when its stdin closes, i.e. when the pdsh/ssh client that started it is gone."""
    from shardspeed.launcher.hostfile import encode_world

    cmd = [job.python, "-u", "-m", "shardspeed.launcher", "--no_ssh", "--watch_stdin", "--node_rank", node_rank,
           "--world_info", encode_world(job.world), "--master_addr", job.master_addr,
           "--master_port", str(job.master_port)]
    cmd += [flag for flag, on in (("--module", job.module), ("--no_python", job.no_python),
                                  ("--no_local_rank", job.no_local_rank)) if on]
    return cmd + [job.target, *job.target_args]


def _remote_shell(job: Job, node_rank: str) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(job.env.items()))
    return f"{exports}cd {shlex.quote(job.cwd)} && {shlex.join(node_spawner(job, node_rank))}"


def pdsh_command(job: Job) -> list[str]:
    """One pdsh call: ``%n`` becomes each node's rank (0..N-1 in -w order)."""
    return ["pdsh", "-S", "-f", "1024", *job.launcher_args, "-w", ",".join(job.world),
            _remote_shell(job, "%n")]


def ssh_commands(job: Job) -> list[list[str]]:
    """One ssh per node, supervised together by the launcher."""
    return [["ssh", "-o", "BatchMode=yes", *job.launcher_args, host, _remote_shell(job, str(i))]
            for i, host in enumerate(job.world)]


def _rendezvous_env(job: Job) -> dict[str, str]:
    return {"MASTER_ADDR": job.master_addr, "MASTER_PORT": str(job.master_port), **job.env}


def openmpi_command(job: Job, exe: str = "mpirun") -> list[str]:
    hosts = ",".join(f"{h}:{len(s)}" for h, s in job.world.items())
    cmd = [exe, "-n", str(job.total), "--host", hosts, "--map-by", "slot", "--bind-to", "none"]
    for k, v in sorted(_rendezvous_env(job).items()):
        cmd += ["-x", f"{k}={v}"]
    return cmd + job.launcher_args + _target(job)


def _uniform_slots(job: Job, tool: str) -> int:
    counts = {len(s) for s in job.world.values()}
    if len(counts) != 1:
        per = ", ".join(f"{h}: {len(s)}" for h, s in job.world.items())
        raise ValueError(f"--launcher {tool} starts the same number of ranks on every node; the selection has {per}")
    return counts.pop()


def mpich_command(job: Job, exe: str = "mpirun") -> list[str]:
    cmd = [exe, "-n", str(job.total), "-ppn", str(_uniform_slots(job, "mpich")), "-hosts", ",".join(job.world)]
    for k, v in sorted(_rendezvous_env(job).items()):
        cmd += ["-genv", k, v]
    return cmd + job.launcher_args + _target(job)


def slurm_command(job: Job) -> list[str]:
    exports = ",".join(f"{k}={v}" for k, v in sorted(_rendezvous_env(job).items()))
    cmd = ["srun", "-n", str(job.total), "--nodes", str(len(job.world)),
           "--ntasks-per-node", str(_uniform_slots(job, "slurm")), "--nodelist", ",".join(job.world),
           f"--export=ALL,{exports}"]
    return cmd + job.launcher_args + _target(job)


RUNNERS = {"pdsh": pdsh_command, "openmpi": openmpi_command, "mpich": mpich_command, "slurm": slurm_command}
# Debian installs both MPIs side by side; their own names beat whichever one ``mpirun`` points to.
MPIRUN = {"openmpi": "mpirun.openmpi", "mpich": "mpirun.mpich"}


# What each runner needs on this machine, and where it comes from (Debian/Ubuntu package names).
TOOLS = {"pdsh": ("pdsh", "apt-get install pdsh"), "ssh": ("ssh", "apt-get install openssh-client"),
         "openmpi": ("mpirun", "apt-get install openmpi-bin"), "mpich": ("mpirun", "apt-get install mpich"),
         "slurm": ("srun", "apt-get install slurm-client, and run inside the Slurm cluster")}


def missing_tool(launcher: str, exe: str, which: Callable[[str], str | None] = shutil.which) -> str | None:
    """The message for a runner whose tool ``exe`` is not installed here (None when it is), naming the
    other runners whose tools are."""
    if which(exe):
        return None
    others = [f"--launcher {name}" for name, (tool, _) in TOOLS.items()
              if name != launcher and (which(tool) or which(MPIRUN.get(name, tool)))]
    there = f"; found on this machine: {', '.join(others)}" if others else ""
    return (f"--launcher {launcher} runs '{exe}', which is not installed on this machine (not on PATH). "
            f"Install it ({TOOLS[launcher][1]}) or choose another --launcher{there}; or start each node "
            f"by hand with --no_ssh --node_rank N")
