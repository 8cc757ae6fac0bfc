"""The multi-node paths of the CLI: pick the slots, then either start this node's ranks (node mode:
``--no_ssh``, with a hostfile or torchrun-style with ``--num_nodes``), start them here when the only
host selected is this machine, or start every node through a runner and supervise it."""

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
from shardspeed.launcher.runners import MPIRUN, RUNNERS, Job, env_to_export, missing_tool, ssh_commands
from shardspeed.launcher.supervisor import LaunchError, RankSpec, Supervisor

DEFAULT_PORT = 29500


def selection(args: argparse.Namespace) -> OrderedDict[str, list[int]]:
    if args.world_info:
        return decode_world(args.world_info)
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
    elif args.num_nodes > 1:
        return _nodes_by_hand(args)
    else:  # --force_multi / --no_ssh without a hostfile: this machine, --num_procs slots
        hosts = OrderedDict([("localhost", args.num_procs or 1)])
    return select(hosts, args.include, args.exclude, args.num_nodes, args.num_procs or -1)


def _nodes_by_hand(args: argparse.Namespace) -> OrderedDict[str, list[int]]:
    """torchrun's way: the same command on every node, no hostfile; every node runs --num_procs ranks.
    Only this node's name is known: the others are named by their node rank."""
    from shardspeed.launcher.cli import default_num_procs

    n = args.num_nodes
    if not args.no_ssh:
        raise HostfileError(f"--num_nodes {n} without --hostfile: either pass --hostfile (the nodes are started "
                            f"from here), or run this command on every node with --no_ssh --node_rank N "
                            f"--master_addr ADDR (N = 0..{n - 1}, ADDR = node 0's address)")
    if args.include or args.exclude:
        raise HostfileError(f"--include/--exclude select hosts and slots of a --hostfile; with --num_nodes {n} "
                            "--no_ssh and no hostfile every node runs --num_procs ranks: drop them, or pass "
                            "--hostfile")
    if args.master_addr is None:
        raise HostfileError(f"--num_nodes {n} --no_ssh without a hostfile: pass --master_addr, the address of node 0 "
                            f"that every node can reach, the same on every node (e.g. --master_addr 10.0.0.5)")
    k = args.num_procs if args.num_procs is not None else default_num_procs()
    if k < 1:
        raise HostfileError(f"--num_procs must be at least 1, got {k}")
    me = socket.gethostname()
    return OrderedDict(((me if i == args.node_rank else f"node-{i}"), list(range(k))) for i in range(n))


def run(args: argparse.Namespace) -> int:
    world = selection(args)
    hosts = list(world)
    if args.no_ssh:
        if not 0 <= args.node_rank < len(hosts):
            raise HostfileError(f"--node_rank {args.node_rank}: the selection has nodes 0-{len(hosts) - 1} "
                                f"({', '.join(hosts)})")
        addr = args.master_addr or ("127.0.0.1" if len(hosts) == 1 else _resolve(hosts[0]))
        who = f"shardspeed node {args.node_rank} ({hosts[args.node_rank]})"
        # without a hostfile no slots were selected: the ranks see the devices the user left visible
        sup = _node(args, world, args.node_rank, addr, args.master_port or DEFAULT_PORT, who,
                    devices=bool(args.hostfile or args.world_info))
        sup.start()
        if args.watch_stdin:
            threading.Thread(target=_abort_on_eof, args=(sup,), daemon=True).start()
        return sup.wait()
    if (len(hosts) == 1 and args.launcher in ("pdsh", "ssh") and not args.force_multi
            and is_this_machine(hosts[0])):
        return _run_here(args, world)
    return _run_nodes(args, world)


def _node(args: argparse.Namespace, world: OrderedDict[str, list[int]], node_rank: int, addr: str, port: int,
          who: str, devices: bool = True) -> Supervisor:
    """The supervisor of one node's ranks: global ranks follow the nodes' slots in node order."""
    from shardspeed.launcher.cli import rank_command, rank_env  # the local path's pieces

    hosts = list(world)
    slots = world[hosts[node_rank]]
    first = sum(len(world[h]) for h in hosts[:node_rank])
    total = sum(len(s) for s in world.values())
    base = dict(os.environ)
    if devices:  # the selected slots are the devices this node's ranks see; LOCAL_RANK indexes into them
        base["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in slots)
    specs = [RankSpec(first + i, rank_command(args, i),
                      rank_env(base, first + i, total, addr, port, local_rank=i, local_world=len(slots)))
             for i in range(len(slots))]
    return Supervisor(specs, prefix=not args.no_prefix, who=who)


def _run_here(args: argparse.Namespace, world: OrderedDict[str, list[int]]) -> int:
    """The only host selected is this machine: start its ranks directly, as DeepSpeed's launcher does;
    pdsh/ssh would only add a hop to ourselves (and a tool that may not be installed). MPI and Slurm
    are still used when asked for: an allocation may require its ranks to be started by srun/mpirun."""
    from shardspeed.launcher.cli import pick_port

    addr = args.master_addr or "127.0.0.1"
    port, note = pick_port(addr, args.master_port)
    host = next(iter(world))
    sup = _node(args, world, 0, addr, port, "shardspeed")
    sup.say(f"{host} is this machine: starting its {len(world[host])} selected slot(s) here, without "
            f"{args.launcher} (--force_multi to use it)")
    if note:
        sup.say(note)
    sup.start()
    return sup.wait()


def _run_nodes(args: argparse.Namespace, world: OrderedDict[str, list[int]]) -> int:
    hosts = list(world)
    port = args.master_port or DEFAULT_PORT
    addr = args.master_addr or _resolve(hosts[0])
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
    missing = missing_tool(args.launcher, specs[0].cmd[0])
    if missing:
        raise LaunchError(missing)
    # each node's launcher prefixes its own ranks' lines: this one reads their reports of failures
    remote = args.launcher in ("pdsh", "ssh")
    sup = Supervisor(specs, prefix=False, who="shardspeed", watch=node_failure if remote else None)
    sup.say(f"{args.launcher}: {len(hosts)} node(s), {job.total} rank(s), master {addr}:{port}")
    sup.start()
    return sup.wait()


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine: loopback, its hostname, or a name of one of its addresses."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return True
    me = socket.gethostname()
    if host in (me, me.split(".")[0], socket.getfqdn()):
        return True
    try:
        theirs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:  # not resolvable here: not a name of ours
        return False
    return any(a.startswith("127.") or a == "::1" for a in theirs) or bool(theirs & _local_addresses())


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


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
