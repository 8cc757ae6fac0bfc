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
