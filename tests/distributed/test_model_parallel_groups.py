"""initialize_model_parallel on real ranks: every group holds exactly the ranks ProcessTopology says
(checked by a collective over the group, not by our bookkeeping), both vocabularies agree, and
topology_from_mpu reads the unit the way the engine will."""

import pytest

from shardspeed.comm import PipeModelDataParallelTopology
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.world_size(4)


def _probe(mpu):
    """What the unit says about this rank, and who answers a collective on each of its groups."""
    from shardspeed import comm

    groups = {"tensor": mpu.get_tensor_model_parallel_group(), "data": mpu.get_data_parallel_group(),
              "pipe": mpu.get_pipeline_model_parallel_group(), "model": mpu.get_model_parallel_group()}
    topo = comm.topology_from_mpu(mpu)
    return {
        "members": {k: comm.all_gather_object(comm.get_rank(), group=g) for k, g in groups.items()},
        "deepspeed": (mpu.get_slice_parallel_rank(), mpu.get_slice_parallel_world_size(),
                      mpu.get_pipe_parallel_rank(), mpu.get_pipe_parallel_world_size(),
                      mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(),
                      mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
        "megatron": (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
                     mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size(),
                     mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
        "stages": (mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage(),
                   mpu.get_pipeline_model_parallel_next_rank(), mpu.get_pipeline_model_parallel_prev_rank()),
        "src": mpu.get_tensor_model_parallel_src_rank(),
        "topology": (topo.tp_rank, topo.tp_world_size, topo.pp_rank, topo.pp_world_size, topo.dp_rank,
                     topo.dp_world_size, topo.mp_rank, topo.mp_world_size),
        "same_topology": mpu.topology() == PipeModelDataParallelTopology(
            mpu.get_pipe_parallel_world_size(), mpu.get_slice_parallel_world_size(),
            mpu.get_data_parallel_world_size()),
    }


def _groups_worker(rank, layouts, with_errors=False):
    import shardspeed
    from shardspeed import comm

    out = {"errors": _errors(shardspeed, comm) if with_errors else []}
    for t, p in layouts:
        mpu = shardspeed.initialize_model_parallel(tensor_parallel_size=t, pipeline_parallel_size=p)
        assert comm.get_model_parallel_unit() is mpu
        assert shardspeed.initialize_model_parallel(tensor_parallel_size=t, pipeline_parallel_size=p) is mpu
        out[(t, p)] = _probe(mpu)
        comm.destroy_model_parallel()
        assert comm.get_model_parallel_unit() is None
    return out


def _expected(world, t, p, rank):
    topo = PipeModelDataParallelTopology(num_pp=p, num_mp=t, num_dp=world // (t * p))
    c = topo.get_coord(rank)

    def along(axis):
        return next(g for g in topo.get_axis_comm_lists(axis) if rank in g)

    model = topo.get_axis_list("data", c.data)
    tensor, data, pipe = along("model"), along("data"), along("pipe")
    ds = (c.model, t, c.pipe, p, c.data, len(data), model.index(rank), t * p)
    return {
        "members": {"tensor": tensor, "data": data, "pipe": pipe, "model": model},
        "deepspeed": ds,
        "megatron": ds[:6],
        "stages": (c.pipe == 0, c.pipe == p - 1, pipe[(c.pipe + 1) % p], pipe[(c.pipe - 1) % p]),
        "src": tensor[0],
        "topology": ds,
        "same_topology": True,
    }


def _check(results, world, layouts):
    for rank, got in enumerate(results):
        for t, p in layouts:
            assert got[(t, p)] == _expected(world, t, p, rank), (rank, t, p)


LAYOUTS_4 = [(2, 1), (2, 2), (4, 1), (1, 2)]


@pytest.fixture(scope="module")
def four_ranks():
    """One 4-rank job for the tests below (each start of 4 ranks costs seconds on 2 cores)."""
    return run_ranks(_groups_worker, 4, LAYOUTS_4, True)


def test_groups_match_the_topology_on_4_ranks(four_ranks):
    results = four_ranks
    _check(results, 4, LAYOUTS_4)
    # the layouts the issue names, spelled out: tensor neighbours, then data, then pipe
    assert results[1][(2, 1)]["members"] == {"tensor": [0, 1], "data": [1, 3], "pipe": [1], "model": [0, 1]}
    assert results[1][(2, 2)]["members"] == {"tensor": [0, 1], "data": [1], "pipe": [1, 3], "model": [0, 1, 2, 3]}


@pytest.mark.world_size(8)
def test_groups_match_the_topology_on_8_ranks():
    layouts = [(2, 2)]
    results = run_ranks(_groups_worker, 8, layouts)
    _check(results, 8, layouts)
    assert results[5][(2, 2)]["members"] == {"tensor": [4, 5], "data": [5, 7], "pipe": [1, 5], "model": [0, 1, 4, 5]}


def _errors(shardspeed, comm):
    messages = []
    for t, p in ((3, 1), (2, 3)):
        try:
            shardspeed.initialize_model_parallel(tensor_parallel_size=t, pipeline_parallel_size=p)
        except ValueError as e:
            messages.append(str(e))
    shardspeed.initialize_model_parallel(tensor_parallel_size=2)
    try:
        shardspeed.initialize_model_parallel(tensor_parallel_size=4)
    except RuntimeError as e:
        messages.append(str(e))
    comm.destroy_model_parallel()
    return messages


def test_sizes_that_do_not_divide_the_world_are_refused_by_number(four_ranks):
    for result in four_ranks:
        assert result["errors"] == [
            "tensor_parallel_size 3 does not divide the world size 4: the ranks cannot be split into equal model "
            "replicas; use a T that divides 4",
            "tensor_parallel_size 2 × pipeline_parallel_size 3 = 6 does not divide the world size 4: the ranks "
            "cannot be split into equal model replicas; use a T × P that divides 4",
            "model parallelism is already initialised with tensor_parallel_size 2, pipeline_parallel_size 1; call "
            "shardspeed.comm.destroy_model_parallel() before initialising it with 4, 1",
        ]
