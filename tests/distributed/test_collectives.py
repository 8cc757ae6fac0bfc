"""The comm layer's flat collectives on gloo (Note: flat collectives on gloo in comm/collectives.py):
a reduce-scatter done as an in-place all-reduce and an all-gather done as one broadcast per rank give
what torch's flat collectives give, sync and async, on the world and on a sub-group, and the
reduce-scatter of a scratch buffer holds no full-size temporary."""

import pytest
import torch

from tests.distributed.harness import run_ranks


def _exchange(rank, async_op):
    from shardspeed import comm

    comm.init_distributed()
    world = comm.get_world_size()
    sub = comm.new_group([1, 2])  # every rank makes every group, in the same order
    out = {}
    for name, group, members in (("world", comm.world_group(), list(range(world))), ("sub", sub, [1, 2])):
        if rank not in members:
            continue
        me, size = members.index(rank), len(members)
        inputs = [torch.arange(6 * size, dtype=torch.float32) * (r + 1) for r in members]
        want = sum(inputs).view(size, -1)[me]
        # reduce-scatter into a separate output, and into the input's own chunk
        scratch = inputs[me].clone()
        sep = torch.empty(6)
        h = comm.reduce_scatter(sep, scratch, group=group, async_op=async_op, scratch=True)
        h.wait()
        own = inputs[me].clone()
        h = comm.reduce_scatter(own.view(size, -1)[me], own, group=group, async_op=async_op, scratch=True)
        h.wait()
        plain = torch.empty(6)
        comm.reduce_scatter(plain, inputs[me].clone(), group=group)
        # all-gather from a separate input, and in place from the output's own chunk
        gathered = torch.empty(6 * size)
        comm.all_gather(gathered, torch.full((6,), float(rank)), group=group, async_op=async_op).wait()
        inplace = torch.zeros(6 * size)
        inplace.view(size, -1)[me].fill_(float(rank))
        comm.all_gather(inplace, inplace.view(size, -1)[me], group=group, async_op=async_op).wait()
        expected = torch.cat([torch.full((6,), float(r)) for r in members])
        out[name] = {"rs_sep": torch.equal(sep, want), "rs_own": torch.equal(own.view(size, -1)[me], want),
                     "rs_plain": torch.equal(plain, want), "ag": torch.equal(gathered, expected),
                     "ag_inplace": torch.equal(inplace, expected)}
    return out


@pytest.mark.parametrize("async_op", [False, True])
def test_gloo_reduce_scatter_and_all_gather_equal_the_flat_collectives(async_op):
    results = run_ranks(_exchange, 3, async_op)
    for rank, r in enumerate(results):
        for name, checks in r.items():
            assert all(checks.values()), (rank, name, checks)
        assert ("sub" in r) == (rank in (1, 2))


def _peak_of_reduce_scatter(rank, scratch):
    import os
    import threading
    import time

    from shardspeed import comm

    comm.init_distributed()

    def anon():
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")

    x, out = torch.randn(4_000_000), torch.empty(2_000_000)  # 16 MB
    comm.reduce_scatter(out, x.clone(), scratch=scratch)  # warm up the transport
    base, peak, stop = anon(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    comm.reduce_scatter(out, x, scratch=scratch)
    stop.set()
    t.join()
    return max(peak[0], anon()) - base


def test_scratch_reduce_scatter_on_gloo_holds_no_full_size_temporary(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    flat = max(run_ranks(_peak_of_reduce_scatter, 2, False))
    scratch = max(run_ranks(_peak_of_reduce_scatter, 2, True))
    assert flat > 12e6  # torch's reduce_scatter on gloo copies the 16 MB input
    assert scratch < 6e6, (flat, scratch)
