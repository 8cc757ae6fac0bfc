"""Which parameters stage 3 gathers together (zero/stage3.py, Note: units)."""

import torch

from examples.gpt_model import GPT, GPTConfig
from shardspeed.zero.stage3_parts import Stage3Options
from shardspeed.zero.stage3_parts import unit_members as _unit_members


def _names(units):
    return [[n for n, _ in members] for _, members in units]


def test_each_layer_of_a_module_list_is_one_unit():
    model = GPT(GPTConfig(vocab=50, seq=8, layers=3, hidden=16, heads=2, tie_embeddings=True))
    units = _unit_members(model, Stage3Options())
    names = _names(units)
    blocks = [u for u in names if u[0].startswith("blocks.")]
    assert len(blocks) == 3
    assert blocks[1] == [n for n, _ in model.blocks[1].named_parameters(prefix="blocks.1")]
    # the tied head weight is the embedding's: gathered once, with the embedding
    flat = [n for u in names for n in u]
    assert "head.weight" not in flat and flat.count("tok.weight") == 1
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())


def test_layers_too_large_for_the_live_cap_and_switched_off_fall_back_to_modules():
    model = GPT(GPTConfig(vocab=50, seq=8, layers=2, hidden=16, heads=2))
    per_module = _names(_unit_members(model, Stage3Options(coalesce_layers=False)))
    block = sum(p.numel() for p in model.blocks[0].parameters())
    capped = _names(_unit_members(model, Stage3Options(max_live_numel=2 * block - 1)))
    assert per_module == capped
    assert ["blocks.0.qkv.weight"] in per_module


def test_sequential_children_are_units():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert _names(_unit_members(model, Stage3Options())) == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]


def test_flat_layout_pieces_cover_every_parameter_once():
    from shardspeed.zero.unit_layout import flat_layout

    numels = [5, 40, 1, 17]
    for world in (1, 2, 3, 4, 7):
        layouts = [flat_layout(numels, world, r, align=8) for r in range(world)]
        lay = layouts[0]
        assert lay.offsets == (0, 8, 48, 56) and all(o % 8 == 0 for o in lay.offsets)
        assert world * lay.shard >= 73 and lay.shard == -(-73 // world)
        # the gaps are exactly the flat positions no parameter covers
        covered = set()
        for o, n in zip(lay.offsets, numels, strict=True):
            covered |= set(range(o, o + n))
        gaps = {i for lo, hi in lay.gaps for i in range(lo, hi)}
        assert gaps == set(range(world * lay.shard)) - covered
        for i, n in enumerate(numels):  # the ranks' pieces of a parameter tile it exactly
            got = sorted((lay_r.pieces[i][0], lay_r.pieces[i][2]) for lay_r in layouts if lay_r.pieces[i][2])
            assert sum(length for _, length in got) == n
            assert all(a + la == b for (a, la), (b, _) in zip(got, got[1:], strict=False))
            for r, lay_r in enumerate(layouts):  # and sit where the rank's shard holds them
                start, at, length = lay_r.pieces[i]
                if length:
                    assert r * lay.shard + at == lay.offsets[i] + start
    assert flat_layout([], 2, 0).shard == 0
