"""Checkpoint re-slicing across tensor-parallel sizes, in one process: the geometry of a cut agrees
with ``take_slice`` (strided cuts too), saved pieces of any (T, D) layout fill any other, and
refusals name the parameter and the sizes."""

import itertools
import random

import pytest
import torch

from shardspeed.checkpoint import CheckpointError
from shardspeed.checkpoint.pieces import copy_into, layout_for, transfers
from shardspeed.tensor_parallel.meta import SliceSpec, join_slices, take_slice

# (full shape, dim, stride): a row cut, a column cut, a fused qkv (stride 3), a 3-d tensor's middle dim
CUTS = [((8, 6), 0, 1), ((4, 8), 1, 1), ((12, 4), 0, 3), ((2, 12, 3), 1, 3), ((16,), 0, 2)]


@pytest.mark.parametrize("shape, dim, stride", CUTS)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_geometry_matches_take_slice(shape, dim, stride, world):
    if shape[dim] % (world * stride):
        pytest.skip("not cuttable")
    full = torch.arange(torch.Size(shape).numel()).view(shape)  # each element is its own full index
    spec = SliceSpec(dim, stride)
    slices = [take_slice(full, spec, world, r) for r in range(world)]
    assert torch.equal(join_slices(slices, spec), full)  # strided slices round-trip
    for r, local in enumerate(slices):
        layout = layout_for("w", shape, spec, world, r, held=tuple(local.shape))
        idx = torch.arange(local.numel())
        if layout is None:
            assert world == 1 and torch.equal(local.reshape(-1), idx)
            continue
        assert torch.equal(layout.to_full(idx), local.reshape(-1))
        owner, back = layout.from_full(local.reshape(-1))
        assert torch.equal(back, idx) and bool((owner == r).all())


def _pieces(flat: torch.Tensor, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    """``flat`` cut at random points into ``parts`` ranges (ZeRO shards straddle anywhere)."""
    cuts = sorted(rng.sample(range(1, flat.numel()), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, flat.numel()]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("shape, dim, stride", CUTS)
def test_pieces_written_at_one_layout_fill_any_other(shape, dim, stride):
    rng = random.Random(0)
    full = torch.randn(shape)
    spec = SliceSpec(dim, stride)
    worlds = [w for w in (1, 2, 4) if shape[dim] % (w * stride) == 0]
    for t_saved, t_loaded in itertools.product(worlds, worlds):
        cut = layout_for("w", shape, spec, t_saved, 0)
        saved = []  # (start, length, rank, values): each slice cut into 3 data-parallel pieces
        for r in range(t_saved):
            flat = take_slice(full, spec, t_saved, r).reshape(-1)
            saved += [(a, n, r, flat[a:a + n]) for a, n in _pieces(flat, 3, rng)]
        for r in range(t_loaded):
            want = take_slice(full, spec, t_loaded, r).reshape(-1)
            mine = layout_for("w", shape, spec, t_loaded, r, held=tuple(take_slice(full, spec, t_loaded, r).shape))
            for a, n in _pieces(want, 2, rng):
                dest = torch.full((n,), float("nan"))
                got = sum(copy_into(dest, saved[k][3], d, s)
                          for k, d, s in transfers((a, n), mine, [x[:3] for x in saved], cut))
                assert got == n and torch.equal(dest, want[a:a + n]), (t_saved, t_loaded, r)


def test_a_whole_model_loads_slices_and_slices_load_whole():
    full = torch.randn(12, 4)
    spec = SliceSpec(0, 3)
    cut = layout_for("qkv", full.shape, spec, 2, 0)
    saved = [(0, 24, r) for r in range(2)]
    values = [take_slice(full, spec, 2, r).reshape(-1) for r in range(2)]
    dest = torch.empty(48)
    for k, d, s in transfers((0, 48), None, saved, cut):  # to an unsliced model (and zero_to_fp32)
        copy_into(dest, values[k], d, s)
    assert torch.equal(dest.view(12, 4), full)
    mine = layout_for("qkv", full.shape, spec, 4, 3, held=(3, 4))
    dest = torch.empty(12)
    for _, d, s in transfers((0, 12), mine, [(0, 48, 0)], None):  # from an unsliced checkpoint
        copy_into(dest, full.reshape(-1), d, s)
    assert torch.equal(dest.view(3, 4), take_slice(full, spec, 4, 3))


def test_same_cut_compares_flat_ranges_without_index_arithmetic():
    layout = layout_for("w", (8, 6), SliceSpec(1), 2, 1)
    moves = list(transfers((4, 10), layout, [(0, 8, 1), (8, 16, 1), (0, 24, 0)], layout_for("w", (8, 6),
                                                                                            SliceSpec(1), 2, 0)))
    assert [(k, d, s) for k, d, s in moves] == [(0, slice(0, 4), slice(4, 8)), (1, slice(4, 10), slice(0, 6))]


def test_a_cut_that_does_not_divide_names_the_parameter_and_sizes():
    with pytest.raises(CheckpointError) as e:
        layout_for("blocks.0.qkv.weight", (96, 32), SliceSpec(0, 3), 5, 0, held=(18, 32))
    assert str(e.value) == ("parameter 'blocks.0.qkv.weight' of full shape (96, 32) cannot be cut into 5 "
                            "tensor-parallel slices along dim 0 (3 blocks each cut 5 ways): 96 is not divisible by "
                            "15; this model holds (18, 32) per rank")
    with pytest.raises(CheckpointError, match=r"parameter 'fc.weight' of full shape \(6, 8\) cannot be cut into 4 "
                                              r"tensor-parallel slices along dim 0: 6 is not divisible by 4$"):
        layout_for("fc.weight", (6, 8), SliceSpec(0), 4, 0)


def test_a_model_of_another_size_is_refused_with_both_shapes():
    with pytest.raises(CheckpointError) as e:
        layout_for("blocks.0.fc.weight", (128, 32), SliceSpec(0), 4, 2, held=(24, 32))
    assert str(e.value) == ("parameter 'blocks.0.fc.weight' has full shape (128, 32) in the checkpoint, but this "
                            "model at tensor-parallel size 4 holds (24, 32) per rank: a full shape of (96, 32)")
    with pytest.raises(CheckpointError) as e:
        layout_for("head.weight", (64, 32), None, 2, 0, held=(32, 32))
    assert str(e.value) == ("parameter 'head.weight' has shape (64, 32) in the checkpoint, but this model holds it "
                            "whole as (32, 32)")
    with pytest.raises(CheckpointError, match=r"parameter 'b' of shape \(4,\) is marked as cut along dim 1, "):
        layout_for("b", (4,), SliceSpec(1), 2, 0)
