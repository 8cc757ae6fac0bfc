"""The multi-node paths of the CLI: pick the slots, then either start this node's ranks (node mode)
or start every node through a runner and supervise it."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from collections import OrderedDict

from shardspeed.launcher.hostfile import HostfileError, decode_world, read_hostfile, select
from shardspeed.launcher.runners import RUNNERS, Job, env_to_export, ssh_commands
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
        specs = [RankSpec(first + i, rank_command(args, i),
                          rank_env(dict(os.environ), first + i, total, addr, port, local_rank=i,
                                   local_world=len(slots)))
                 for i in range(len(slots))]
        who = f"shardspeed node {args.node_rank} ({hosts[args.node_rank]})"
        sup = Supervisor(specs, prefix=not args.no_prefix, who=who)
        sup.start()
        return sup.wait()
    addr = args.master_addr if args.master_addr != "127.0.0.1" else _resolve(hosts[0])
    job = Job(world=world, master_addr=addr, master_port=port, target=args.target, target_args=list(args.target_args),
              module=args.module, no_python=args.no_python, no_local_rank=args.no_local_rank,
              launcher_args=shlex.split(args.launcher_args), env=env_to_export(dict(os.environ), os.getcwd()))
    if args.launcher == "ssh":
        cmds = ssh_commands(job)
    else:
        cmds = [RUNNERS[args.launcher](job)]
    # each node's launcher prefixes its own ranks' lines: this one labels the nodes
    specs = [RankSpec(i, cmd, dict(os.environ)) for i, cmd in enumerate(cmds)]
    sup = Supervisor(specs, prefix=False, who="shardspeed")
    sup.say(f"{args.launcher}: {len(hosts)} node(s), {job.total} rank(s), master {addr}:{port}")
    sup.start()
    return sup.wait()


def _resolve(host: str) -> str:
    """An address the other nodes can reach rank 0 at: the first host, as named in the hostfile."""
    if host in ("localhost", "127.0.0.1"):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host
