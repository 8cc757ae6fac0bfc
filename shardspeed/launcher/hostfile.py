"""Hostfiles and the ``--include`` / ``--exclude`` / ``--num_nodes`` / ``--num_gpus`` selection of
ranks across machines. Pure functions: no network, no processes.

A hostfile has one ``hostname slots=N`` line per machine; ``#`` starts a comment; blank lines are
ignored. A selection names hosts and, after a colon, slot indices: ``worker-0:0,2@worker-1``
(``@`` separates hosts; a host without a colon means all its slots).
"""

from __future__ import annotations

import re
from collections import OrderedDict

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+)\s+slots\s*=\s*(?P<slots>\d+)\s*$")


class HostfileError(ValueError):
    """A hostfile or a selection that cannot be used; the message says where and what."""


def parse_hostfile(text: str, path: str = "<hostfile>") -> OrderedDict[str, int]:
    """``{host: slots}`` in file order."""
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise HostfileError(f"{path}:{number}: expected 'hostname slots=N', got {raw.strip()!r}")
        host, slots = m.group("host"), int(m.group("slots"))
        if slots < 1:
            raise HostfileError(f"{path}:{number}: {host} has slots={slots}; a host needs at least one slot")
        if host in hosts:
            raise HostfileError(f"{path}:{number}: {host} is listed twice (first with slots={hosts[host]})")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{path}: no 'hostname slots=N' lines")
    return hosts


def read_hostfile(path: str) -> OrderedDict[str, int]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise HostfileError(f"cannot read hostfile {path}: {e.strerror}") from None
    return parse_hostfile(text, path)


def _parse_selection(spec: str, hosts: OrderedDict[str, int], flag: str) -> OrderedDict[str, list[int]]:
    out: OrderedDict[str, list[int]] = OrderedDict()
    for part in filter(None, spec.split("@")):
        host, _, slots = part.partition(":")
        if host not in hosts:
            known = ", ".join(hosts)
            raise HostfileError(f"{flag} {spec!r}: host {host!r} is not in the hostfile (hosts: {known})")
        if slots:
            try:
                idx = [int(s) for s in slots.split(",")]
            except ValueError:
                raise HostfileError(f"{flag} {spec!r}: slots of {host} must be integers, got {slots!r}") from None
            bad = [i for i in idx if not 0 <= i < hosts[host]]
            if bad:
                raise HostfileError(f"{flag} {spec!r}: {host} has slots 0-{hosts[host] - 1}, not {bad}")
        else:
            idx = list(range(hosts[host]))
        out.setdefault(host, [])
        out[host] = sorted(set(out[host]) | set(idx))
    return out


def select(hosts: OrderedDict[str, int], include: str = "", exclude: str = "", num_nodes: int = -1,
           num_slots: int = -1) -> OrderedDict[str, list[int]]:
    """The slots to run on: ``{host: [slot, ...]}`` in hostfile order."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    if include:
        chosen = _parse_selection(include, hosts, "--include")
        chosen = OrderedDict((h, chosen[h]) for h in hosts if h in chosen)
    else:
        chosen = OrderedDict((h, list(range(n))) for h, n in hosts.items())
        if exclude:
            for host, idx in _parse_selection(exclude, hosts, "--exclude").items():
                chosen[host] = [i for i in chosen[host] if i not in idx]
            chosen = OrderedDict((h, s) for h, s in chosen.items() if s)
    if num_nodes > 0:
        if num_nodes > len(chosen):
            raise HostfileError(f"--num_nodes {num_nodes}: only {len(chosen)} host(s) are available "
                                f"({', '.join(chosen)})")
        chosen = OrderedDict(list(chosen.items())[:num_nodes])
    if num_slots > 0:
        short = {h: len(s) for h, s in chosen.items() if len(s) < num_slots}
        if short:
            have = ", ".join(f"{h} has {n}" for h, n in short.items())
            raise HostfileError(f"--num_gpus/--num_procs {num_slots} per node is more than the hostfile offers: {have}")
        chosen = OrderedDict((h, s[:num_slots]) for h, s in chosen.items())
    if not chosen:
        raise HostfileError("no slots left to run on after --include/--exclude")
    return chosen


def encode_world(world: OrderedDict[str, list[int]]) -> str:
    """A compact, shell-safe form of the selection, handed to each node's spawner."""
    return "@".join(f"{h}:{','.join(map(str, s))}" for h, s in world.items())


def decode_world(text: str) -> OrderedDict[str, list[int]]:
    out: OrderedDict[str, list[int]] = OrderedDict()
    for part in filter(None, text.split("@")):
        host, _, slots = part.partition(":")
        out[host] = [int(s) for s in slots.split(",")]
    return out
