"""``shardspeed [--num_procs N | --num_gpus N] [--master_port P] script.py ARGS``: on this machine, or
across the machines of a hostfile through pdsh, ssh, Open MPI, MPICH or Slurm (runners.py), or as one
node of a job started by hand on every node (``--no_ssh --node_rank N``)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from shardspeed.launcher import multinode
from shardspeed.launcher.hostfile import HostfileError
from shardspeed.launcher.supervisor import LaunchError, RankSpec, Supervisor

EXAMPLES = """examples:
  shardspeed --num_procs 2 train.py --deepspeed --deepspeed_config ds_config.json
  shardspeed --num_gpus 8 --master_port 29600 train.py
  python -m shardspeed.launcher --num_procs 4 --module my_pkg.train --lr 1e-3
  shardspeed --hostfile hosts --include "worker-0:0,1@worker-1" train.py     # pdsh to two machines
  shardspeed --hostfile hosts --launcher ssh --launcher_args "-p 2222" train.py
  shardspeed --hostfile hosts --launcher openmpi --num_nodes 2 --num_gpus 4 train.py
  shardspeed --hostfile hosts --no_ssh --node_rank 1 --master_addr worker-0 train.py   # on each node
  shardspeed --num_nodes 2 --node_rank 1 --num_procs 4 --master_addr 10.0.0.5 --master_port 29600 --no_ssh \
      train.py                         # torchrun-style, no hostfile: the same on each node, its own --node_rank

hostfile lines: "worker-0 slots=4" (# comments and blank lines allowed)
"""

DEFAULT_PORT = 29500


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardspeed", description="Launch a training script on several ranks, on this machine or across machines.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_procs", "--num_gpus", dest="num_procs", type=int, default=None,
                   help="ranks on this machine (default: number of GPUs, or 1 on CPU); e.g. --num_procs 2")
    p.add_argument("--master_addr", default=None,
                   help="address of rank 0 (default 127.0.0.1; with a hostfile: the first host; nodes started "
                   "by hand without a hostfile must pass it), e.g. --master_addr 10.0.0.5")
    p.add_argument("--master_port", type=int, default=None,
                   help=f"TCP port of the rendezvous (default {DEFAULT_PORT}, or a free one if it is taken), "
                   "e.g. --master_port 29600")
    p.add_argument("--no_local_rank", action="store_true",
                   help="do not pass --local_rank=N to the script (LOCAL_RANK is still set), e.g. for scripts "
                   "without that argument")
    p.add_argument("--module", action="store_true", help="run the target as a module: python -m TARGET, "
                   "e.g. --module my_pkg.train")
    p.add_argument("--no_python", action="store_true", help="run the target as an executable, not with python, "
                   "e.g. --no_python ./train.sh")
    p.add_argument("--no_prefix", action="store_true", help="do not prefix output lines with [rank N], "
                   "e.g. when the script tags its own lines")
    p.add_argument("--hostfile", default=None, help="machines and their slots, 'host slots=N' per line; e.g. "
                   "--hostfile /job/hostfile (without it: this machine only)")
    p.add_argument("--include", default="", help="only these hosts/slots, e.g. --include 'worker-0:0,2@worker-1'")
    p.add_argument("--exclude", default="", help="all but these hosts/slots, e.g. --exclude 'worker-1:3'")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts of the selection; without a "
                   "hostfile, with --no_ssh: the number of nodes started by hand, e.g. --num_nodes 2")
    p.add_argument("--launcher", default="pdsh", choices=["pdsh", "ssh", "openmpi", "mpich", "slurm"],
                   help="how to start the nodes (default pdsh), e.g. --launcher slurm")
    p.add_argument("--launcher_args", default="", help="extra arguments for the launcher tool, e.g. "
                   "--launcher_args '--mca btl ^openib'")
    p.add_argument("--force_multi", action="store_true",
                   help="use the multi-node launcher even for one host, e.g. to test ssh to localhost")
    p.add_argument("--no_ssh", action="store_true",
                   help="start only this node's ranks (run the same command on every node with its --node_rank), "
                   "e.g. --no_ssh --node_rank 1")
    p.add_argument("--node_rank", type=int, default=-1,
                   help="this node's index in the selection (or 0..--num_nodes-1 without a hostfile), with "
                   "--no_ssh, e.g. --node_rank 0")
    p.add_argument("--world_info", default="", help=argparse.SUPPRESS)  # the selection, from the runners
    p.add_argument("--watch_stdin", action="store_true", help=argparse.SUPPRESS)  # started by pdsh/ssh
    p.add_argument("target", help="the training script (or module with --module)")
    p.add_argument("target_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _port_free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        # as the rendezvous store will: a port in TIME_WAIT from the previous job is free to use
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
            return True
        except OSError:
            return False


def pick_port(addr: str, requested: int | None) -> tuple[int, str | None]:
    if requested is not None:
        return requested, None
    if _port_free(addr, DEFAULT_PORT):
        return DEFAULT_PORT, None
    with socket.socket() as s:
        s.bind((addr, 0))
        port = s.getsockname()[1]
    return port, f"port {DEFAULT_PORT} is in use; using --master_port {port}"


def default_num_procs() -> int:
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:
        return 1


def rank_command(args: argparse.Namespace, local_rank: int) -> list[str]:
    if args.no_python:
        cmd = [args.target]
    elif args.module:
        cmd = [sys.executable, "-u", "-m", args.target]
    else:
        cmd = [sys.executable, "-u", args.target]
    if not args.no_local_rank:
        cmd.append(f"--local_rank={local_rank}")
    return cmd + list(args.target_args)


def rank_env(base: dict[str, str], rank: int, world: int, addr: str, port: int, local_rank: int | None = None,
             local_world: int | None = None) -> dict[str, str]:
    local_rank = rank if local_rank is None else local_rank
    local_world = world if local_world is None else local_world
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(local_world),
               MASTER_ADDR=addr, MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    # Ranks share the cores; oversubscribed intra-op threads slow every rank down (torchrun does the same).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_world)))
    return env


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_ssh or args.hostfile or args.world_info or args.force_multi or args.num_nodes > 1:
        try:
            return multinode.run(args)
        except (HostfileError, LaunchError, ValueError) as e:
            print(f"shardspeed: {e}", file=sys.stderr)
            return 2
    n = args.num_procs if args.num_procs is not None else default_num_procs()
    if n < 1:
        print(f"shardspeed: --num_procs must be at least 1, got {n}", file=sys.stderr)
        return 2
    if not args.module and not args.no_python and not os.path.isfile(args.target):
        print(f"shardspeed: training script not found: {os.path.abspath(args.target)}", file=sys.stderr)
        return 2
    addr = args.master_addr or "127.0.0.1"
    port, note = pick_port(addr, args.master_port)
    specs = [RankSpec(r, rank_command(args, r), rank_env(dict(os.environ), r, n, addr, port)) for r in range(n)]
    sup = Supervisor(specs, prefix=not args.no_prefix)
    if note:
        sup.say(note)
    try:
        sup.start()
    except LaunchError as e:
        print(f"shardspeed: {e}", file=sys.stderr)
        return 2
    return sup.wait()


if __name__ == "__main__":
    raise SystemExit(main())
