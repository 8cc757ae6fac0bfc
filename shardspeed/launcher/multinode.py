"""The multi-node paths of the CLI: pick the slots, then either start this node's ranks (node mode)
or start every node through a runner and supervise it."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import threading
from collections import OrderedDict

from shardspeed.launcher.hostfile import HostfileError, decode_world, read_hostfile, select
from shardspeed.launcher.runners import MPIRUN, RUNNERS, Job, env_to_export, ssh_commands
from shardspeed.launcher.supervisor import RankSpec, Supervisor

DEFAULT_PORT = 29500


def selection(args: argparse.Namespace) -> OrderedDict[str, list[int]]:
    if args.world_info:
        return decode_world(args.world_info)
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
    else:  # --force_multi / --no_ssh without a hostfile: this machine, --num_procs slots
        hosts = OrderedDict([("localhost", args.num_procs or 1)])
    return select(hosts, args.include, args.exclude, args.num_nodes, args.num_procs or -1)


def run(args: argparse.Namespace) -> int:
    from shardspeed.launcher.cli import rank_command, rank_env  # the local path's pieces

    world = selection(args)
    hosts = list(world)
    port = args.master_port or DEFAULT_PORT
    if args.no_ssh:
        if not 0 <= args.node_rank < len(hosts):
            raise HostfileError(f"--node_rank {args.node_rank}: the selection has nodes 0-{len(hosts) - 1} "
                                f"({', '.join(hosts)})")
        addr = args.master_addr if args.master_addr != "127.0.0.1" or len(hosts) == 1 else _resolve(hosts[0])
        slots = world[hosts[args.node_rank]]
        first = sum(len(world[h]) for h in hosts[:args.node_rank])
        total = sum(len(s) for s in world.values())
        # the selected slots are the devices this node's ranks see; LOCAL_RANK indexes into them
        base = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(s) for s in slots)}
        specs = [RankSpec(first + i, rank_command(args, i),
                          rank_env(base, first + i, total, addr, port, local_rank=i, local_world=len(slots)))
                 for i in range(len(slots))]
        who = f"shardspeed node {args.node_rank} ({hosts[args.node_rank]})"
        sup = Supervisor(specs, prefix=not args.no_prefix, who=who)
        sup.start()
        if args.watch_stdin:
            threading.Thread(target=_abort_on_eof, args=(sup,), daemon=True).start()
        return sup.wait()
    addr = args.master_addr if args.master_addr != "127.0.0.1" else _resolve(hosts[0])
    job = Job(world=world, master_addr=addr, master_port=port, target=args.target, target_args=list(args.target_args),
              module=args.module, no_python=args.no_python, no_local_rank=args.no_local_rank,
              launcher_args=shlex.split(args.launcher_args), env=env_to_export(dict(os.environ), os.getcwd()))
    if args.launcher == "ssh":  # one client per node, each holding its node's stdin open
        specs = [RankSpec(i, cmd, dict(os.environ), label=f"node {i} ({hosts[i]})", keep_stdin=True)
                 for i, cmd in enumerate(ssh_commands(job))]
    else:
        exe = MPIRUN.get(args.launcher)
        build = RUNNERS[args.launcher]
        cmd = build(job, exe) if exe and shutil.which(exe) else build(job)
        specs = [RankSpec(0, cmd, dict(os.environ), label=args.launcher)]
    # each node's launcher prefixes its own ranks' lines: this one reads their reports of failures
    remote = args.launcher in ("pdsh", "ssh")
    sup = Supervisor(specs, prefix=False, who="shardspeed", watch=node_failure if remote else None)
    sup.say(f"{args.launcher}: {len(hosts)} node(s), {job.total} rank(s), master {addr}:{port}")
    sup.start()
    return sup.wait()


_FAILED = re.compile(r"\[shardspeed node (\d+) \(([^)]*)\)\] (rank \d+) "
                     r"(exited with code -?\d+|was killed by signal \w+)")


def node_failure(line: str) -> str | None:
    """A node launcher's report of a failed rank (its own words, perhaps behind pdsh's ``host: ``)."""
    m = _FAILED.search(line)
    return f"{m[3]} on node {m[1]} ({m[2]}) {m[4]}" if m else None


def _abort_on_eof(sup: Supervisor) -> None:
    """Started by pdsh/ssh: sshd closes our stdin when the client that started this node is gone."""
    try:  # the raw descriptor: a buffered reader's lock would abort interpreter shutdown
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    sup.abort("the launcher that started this node is gone (its connection closed)")


def _resolve(host: str) -> str:
    """An address the other nodes can reach rank 0 at: the first host, as named in the hostfile."""
    if host in ("localhost", "127.0.0.1"):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host
