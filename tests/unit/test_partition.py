"""ZeRO partition math: padding, shards, and the segments that map shards back to parameters."""

from hypothesis import given
from hypothesis import strategies as st

from shardspeed.zero.partition import padded_size, plan_sharded_buckets, shard_segments


def test_padding():
    assert padded_size(10, 3) == 12 and padded_size(12, 3) == 12 and padded_size(1, 4, align=2) == 8


def test_buckets_respect_groups_and_cap():
    plans = plan_sharded_buckets([["a", "b", "c"], ["d"]], [[(4,), (3, 2), (5,)], [(7,)]], bucket_numel=10,
                                 world_size=3)
    assert [(p.group, [s.name for s in p.plan.slots], p.padded, p.shard) for p in plans] == [
        (0, ["c"], 6, 2), (0, ["b", "a"], 12, 4), (1, ["d"], 9, 3)]


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), world=st.integers(1, 5),
       cap=st.integers(1, 100))
def test_segments_cover_every_element_exactly_once(sizes, world, cap):
    names = [f"p{i}" for i in range(len(sizes))]
    plans = plan_sharded_buckets([names], [[(n,) for n in sizes]], cap, world)
    covered = {n: [0] * s for n, s in zip(names, sizes)}
    for plan in plans:
        assert plan.padded % world == 0 and plan.padded - plan.plan.numel < world
        for rank in range(world):
            used = 0
            for seg in shard_segments(plan, rank):
                assert 0 <= seg.shard_offset and seg.shard_offset + seg.length <= plan.shard
                assert seg.shard_offset + rank * plan.shard == seg.slot.offset + seg.param_offset
                for i in range(seg.param_offset, seg.param_offset + seg.length):
                    covered[seg.slot.name][i] += 1
                used += seg.length
            assert used <= plan.shard
    assert all(c == [1] * len(c) for c in covered.values())
