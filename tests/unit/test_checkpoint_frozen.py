"""Frozen parameters in checkpoints, in one process: saved once as pieces like trainable ones (so a
tensor-parallel slice of a frozen weight has a place too), loaded at any stage, consolidated; and
a format-1 checkpoint (frozen parameters whole in common.pt, no slices) still loads."""

import json

import torch

import shardspeed
from shardspeed.checkpoint import files
from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tests.distributed.workloads import micro_slices, tiny_gpt

FROZEN = "pos.weight"


def _engine(stage, seed=0):
    model = tiny_gpt(seed=seed)
    model.pos.weight.requires_grad_(False)
    cfg = {"train_batch_size": 2, "steps_per_print": None, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    return shardspeed.initialize(model=model, config=cfg)[0]


def _state(engine):
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _saved(tmp_path, stage=1):
    engine = _engine(stage)
    (x, y), = micro_slices(0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")
    return _state(engine)


def test_frozen_parameters_round_trip_at_every_stage(tmp_path):
    want = _saved(tmp_path)
    for stage in (0, 2, 3):
        engine = _engine(stage, seed=1)  # other values everywhere, the frozen weight included
        engine.load_checkpoint(str(tmp_path), tag="t")
        got = _state(engine)
        assert all(torch.equal(got[k], want[k]) for k in want), stage
    full = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")
    assert torch.equal(full[FROZEN], want[FROZEN])


def test_a_format_1_checkpoint_still_loads(tmp_path):
    want = _saved(tmp_path)
    ckpt = tmp_path / "t"
    rank0 = torch.load(ckpt / "rank_0.pt", weights_only=True)  # not mmap'd: the files are rewritten below
    common = torch.load(ckpt / files.COMMON, weights_only=True)
    pieces = dict(rank0["pieces"])
    (_, _, frozen, _, _), = pieces.pop(FROZEN)
    torch.save({"pieces": pieces, "rng": rank0["rng"]}, ckpt / "rank_0.pt")  # what format 1 wrote
    torch.save({**common, "frozen": {FROZEN: frozen.view(want[FROZEN].shape)}}, ckpt / files.COMMON)
    manifest = json.loads((ckpt / files.MANIFEST).read_text())
    del manifest["tensor_parallel"], manifest["files"], manifest["format_version"]
    (ckpt / files.MANIFEST).unlink()
    files.write_manifest(ckpt, manifest)
    text = (ckpt / files.MANIFEST).read_text().replace('"format_version": 2', '"format_version": 1')
    (ckpt / files.MANIFEST).write_text(text)
    engine = _engine(3, seed=1)
    engine.load_checkpoint(str(tmp_path), tag="t")
    got = _state(engine)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")[FROZEN], want[FROZEN])
