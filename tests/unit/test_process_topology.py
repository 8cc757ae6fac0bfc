"""ProcessTopology: DeepSpeed's documented examples, the Megatron order of the 3-D topology, and the
inverse relations between its methods, without processes."""

import itertools

import pytest

from shardspeed.comm import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology


def test_deepspeed_documented_examples():
    x = ProcessTopology(axes=["x", "y"], dims=[2, 3])
    assert x.get_rank(x=0, y=1) == 1
    assert x.get_dim("y") == 3
    coord = x.get_coord(rank=1)
    assert (coord.x, coord.y) == (0, 1)
    assert x.get_axis_list(axis="x", idx=0) == [0, 1, 2]
    assert x.get_axis_list(axis="y", idx=0) == [0, 3]
    ab = ProcessTopology(axes=["a", "b"], dims=[2, 2])
    assert ab.get_rank_repr(rank=3) == "a_01-b_01"
    assert ab.get_rank_repr(rank=3, omit_axes=["a"]) == "b_01"
    pdm = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert pdm.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert pdm.filter_match(pipe=0, data=1) == [2, 3]
    assert [tuple(pdm.get_coord(r)) for r in pdm.filter_match(pipe=0, data=1)] == [(0, 1, 0), (0, 1, 1)]
    assert str(pdm.get_coord(3)) == "ProcessCoord(pipe=0, data=1, model=1)"


def test_pipe_model_data_is_tensor_innermost_then_data_then_pipe():
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    assert [topo.get_dim(a) for a in ("pipe", "data", "model")] == [2, 2, 2] and topo.world_size() == 8
    coords = [tuple(topo.get_coord(r)) for r in range(8)]
    assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.get_rank_repr(5) == "model_01"  # checkpoint names tell the slice, not the replica or stage
    # uneven sizes: the argument order is (pipe, model, data)
    t = PipeModelDataParallelTopology(num_pp=1, num_mp=4, num_dp=2)
    assert (t.get_dim("pipe"), t.get_dim("model"), t.get_dim("data")) == (1, 4, 2)
    assert t.get_axis_comm_lists("model") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.get_axis_comm_lists("pipe") == [[r] for r in range(8)]


def test_pipe_data_topology():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=3)
    assert topo.get_axis_names() == ["pipe", "data"] and topo.world_size() == 6
    assert topo.get_axis_comm_lists("data") == [[0, 1, 2], [3, 4, 5]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 3], [1, 4], [2, 5]]
    # code written for three axes runs on two (DeepSpeed's answers for a missing axis)
    assert topo.get_dim("model") == 0
    assert topo.get_axis_comm_lists("model") == [] and topo.get_axis_list("model", 0) == []
    assert topo.get_rank_repr(4) == ""


@pytest.mark.parametrize("dims", [(1,), (3, 2), (2, 1, 3), (2, 3, 1, 2)])
def test_rank_and_coord_are_inverse_and_comm_lists_partition_the_world(dims):
    axes = [f"a{i}" for i in range(len(dims))]
    topo = ProcessTopology(axes, dims)
    ranks = [topo.get_rank(**dict(zip(axes, c))) for c in itertools.product(*(range(d) for d in dims))]
    assert ranks == list(range(topo.world_size()))  # row-major: product order is rank order
    for r in ranks:
        assert topo.get_rank(**topo.get_coord(r)._asdict()) == r
    for axis in axes:
        lists = topo.get_axis_comm_lists(axis)
        assert sorted(r for group in lists for r in group) == ranks
        for group in lists:
            others = [{a: v for a, v in topo.get_coord(r)._asdict().items() if a != axis} for r in group]
            assert all(o == others[0] for o in others)  # differ only along ``axis``
            assert [getattr(topo.get_coord(r), axis) for r in group] == list(range(topo.get_dim(axis)))


def test_bad_input_names_the_problem():
    topo = ProcessTopology(["pipe", "data"], [2, 2])
    with pytest.raises(ValueError, match=r"missing \['data'\].*filter_match"):
        topo.get_rank(pipe=0)
    with pytest.raises(ValueError, match=r"unknown \['model'\]"):
        topo.get_rank(pipe=0, data=0, model=0)
    with pytest.raises(ValueError, match="coordinate data=2 is outside axis 'data' of size 2"):
        topo.get_rank(pipe=0, data=2)
    with pytest.raises(ValueError, match="rank 4 is not in this topology of 4 ranks"):
        topo.get_coord(4)
    with pytest.raises(ValueError, match=r"filter_match\(\): unknown axis \['tensor'\]"):
        topo.filter_match(tensor=0)
    with pytest.raises(ValueError, match="one size per axis"):
        ProcessTopology(["a", "b"], [2])
    with pytest.raises(ValueError, match="must be >= 1"):
        ProcessTopology(["a"], [0])
    with pytest.raises(ValueError, match="distinct"):
        ProcessTopology(["a", "a"], [1, 1])
