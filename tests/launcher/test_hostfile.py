"""Hostfile parsing and rank selection, with the messages a user reads."""

import pytest

from shardspeed.launcher.hostfile import (
    HostfileError,
    decode_world,
    encode_world,
    parse_hostfile,
    read_hostfile,
    select,
)

HOSTS = """
# two workers
worker-0 slots=4
worker-1 slots=4   # trailing comment

worker-2 slots=2
"""


def test_parse_with_comments_and_blank_lines():
    assert dict(parse_hostfile(HOSTS)) == {"worker-0": 4, "worker-1": 4, "worker-2": 2}


@pytest.mark.parametrize("text,where,what", [
    ("worker-0 slots=4\nworker-1 4\n", ":2:", "'worker-1 4'"),
    ("worker-0 slots=0\n", ":1:", "at least one slot"),
    ("a slots=1\na slots=2\n", ":2:", "listed twice"),
    ("# nothing\n", "", "no 'hostname slots=N' lines"),
])
def test_bad_hostfile_names_file_line_and_text(text, where, what):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(text, "hosts.txt")
    assert str(e.value).startswith("hosts.txt") and where in str(e.value) and what in str(e.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile .*nope"):
        read_hostfile(str(tmp_path / "nope"))


def test_include_exclude_num_nodes_num_slots():
    hosts = parse_hostfile(HOSTS)
    assert select(hosts, include="worker-0:0,2@worker-2") == {"worker-0": [0, 2], "worker-2": [0, 1]}
    assert select(hosts, exclude="worker-1@worker-0:3") == {"worker-0": [0, 1, 2], "worker-2": [0, 1]}
    assert list(select(hosts, num_nodes=2)) == ["worker-0", "worker-1"]
    assert select(hosts, num_nodes=2, num_slots=2) == {"worker-0": [0, 1], "worker-1": [0, 1]}
    assert select(hosts, include="worker-2@worker-0:1") == {"worker-0": [1], "worker-2": [0, 1]}  # file order


@pytest.mark.parametrize("kw,msg", [
    ({"include": "worker-9"}, "host 'worker-9' is not in the hostfile (hosts: worker-0, worker-1, worker-2)"),
    ({"exclude": "worker-0:7"}, "worker-0 has slots 0-3, not [7]"),
    ({"include": "worker-0:x"}, "must be integers"),
    ({"num_slots": 3}, "more than the hostfile offers: worker-2 has 2"),
    ({"num_nodes": 5}, "only 3 host(s) are available"),
    ({"include": "worker-0", "exclude": "worker-1"}, "cannot be used together"),
    ({"exclude": "worker-0@worker-1@worker-2"}, "no slots left"),
])
def test_selection_errors(kw, msg):
    with pytest.raises(HostfileError) as e:
        select(parse_hostfile(HOSTS), **kw)
    assert msg in str(e.value)


def test_world_round_trip():
    world = select(parse_hostfile(HOSTS), include="worker-0:1,3@worker-2")
    assert decode_world(encode_world(world)) == world
