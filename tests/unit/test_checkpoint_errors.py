"""Checkpoint and setup errors a user reads, in one process."""

import json

import pytest
import torch

import shardspeed
from shardspeed.checkpoint import CheckpointError
from tests.distributed.workloads import tiny_gpt

CFG = {"train_batch_size": 2, "steps_per_print": None, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _engine(stage=0, **model):
    return shardspeed.initialize(model=tiny_gpt(**model), config={**CFG, "zero_optimization": {"stage": stage}})[0]


def test_no_latest_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"no tag given and no 'latest' file in {tmp_path}"):
        _engine().load_checkpoint(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path}/t/manifest.json is missing: not a shardspeed checkpoint"):
        _engine().load_checkpoint(str(tmp_path), tag="t")


def test_model_mismatch_names_the_parameters(tmp_path):
    _engine(stage=1).save_checkpoint(str(tmp_path))
    other = _engine(tie_embeddings=True)  # no separate head.weight
    with pytest.raises(CheckpointError, match=r"not in the model \['head.weight'\]"):
        other.load_checkpoint(str(tmp_path))
    other.load_checkpoint(str(tmp_path), load_module_strict=False)


def test_damaged_manifest(tmp_path):
    _engine().save_checkpoint(str(tmp_path), tag="x")
    (tmp_path / "x" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is damaged"):
        _engine().load_checkpoint(str(tmp_path), tag="x")


def test_latest_and_default_tag(tmp_path):
    e = _engine(stage=1)
    e.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == "global_step0"
    manifest = json.loads((tmp_path / "global_step0" / "manifest.json").read_text())
    assert manifest["stage"] == 1 and set(manifest["files"]) == {"common.pt", "rank_0.pt"}
    assert not list(tmp_path.glob(".*partial"))  # the temporary directory was renamed into place


def test_client_optimizer_that_already_stepped():
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    with pytest.raises(ValueError, match="the client optimizer has already taken steps"):
        shardspeed.initialize(model=model, optimizer=opt, config={"train_batch_size": 2})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a callable"):
        shardspeed.initialize(model=tiny_gpt(), optimizer=42, config={"train_batch_size": 2})


def _rewrite_rank0(ckpt, edit):
    """Change rank_0.pt's pieces and reseal the manifest, as a buggy or foreign writer would."""
    from shardspeed.checkpoint import files

    data = torch.load(ckpt / "rank_0.pt", weights_only=True)
    edit(data["pieces"])
    torch.save(data, ckpt / "rank_0.pt")
    manifest = json.loads((ckpt / files.MANIFEST).read_text())
    del manifest["files"], manifest["format_version"]
    files.write_manifest(ckpt, manifest)


def test_a_piece_missing_or_saved_twice_is_named(tmp_path):
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _engine().save_checkpoint(str(tmp_path), tag="t")
    n = tiny_gpt().head.weight.numel()
    _rewrite_rank0(tmp_path / "t", lambda pieces: pieces.pop("head.weight"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*/t is incomplete or inconsistent: parameter 'head.weight' "
                                              rf"elements \[0, {n}\) of this rank got 0 values, not {n}$"):
        _engine(stage=3).load_checkpoint(str(tmp_path), tag="t")
    with pytest.raises(CheckpointError, match=rf"checkpoint .*/t has 0 of the {n} values of parameter 'head.weight'$"):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")
    _engine().save_checkpoint(str(tmp_path), tag="t")
    _rewrite_rank0(tmp_path / "t", lambda pieces: pieces["tok.weight"].append(pieces["tok.weight"][0]))
    m = tiny_gpt().tok.weight.numel()
    with pytest.raises(CheckpointError, match=rf"parameter 'tok.weight' elements \[0, {m}\) of this rank got {2 * m} "):
        _engine().load_checkpoint(str(tmp_path), tag="t")


def test_a_model_of_another_size_names_the_parameter_and_shapes(tmp_path):
    _engine().save_checkpoint(str(tmp_path), tag="t")
    with pytest.raises(CheckpointError, match=r"^parameter 'tok.weight' has shape \(64, 32\) in the checkpoint, but "
                                              r"this model holds it whole as \(64, 16\)$"):
        _engine(hidden=16).load_checkpoint(str(tmp_path), tag="t")


def test_unknown_format_version(tmp_path):
    _engine().save_checkpoint(str(tmp_path), tag="t")
    path = tmp_path / "t" / "manifest.json"
    path.write_text(path.read_text().replace('"format_version": 2', '"format_version": 7'))
    with pytest.raises(CheckpointError, match=r"manifest.json: format version 7, expected one of 1, 2$"):
        _engine().load_checkpoint(str(tmp_path), tag="t")


def test_client_adagrad_is_fresh_though_its_constructor_made_state():
    """torch's Adagrad makes its state (step 0, sum) in the constructor: that is not a step taken,
    and the engine's Adagrad (over its masters) steps as the plain one does."""
    torch.manual_seed(0)
    model, plain = tiny_gpt(), tiny_gpt()
    plain.load_state_dict(model.state_dict())
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5)
    ref = torch.optim.Adagrad(plain.parameters(), lr=0.1, initial_accumulator_value=0.5)
    engine = shardspeed.initialize(model=model, optimizer=opt, config={"train_batch_size": 2, "steps_per_print": None,
                                                                       "zero_optimization": {"stage": 1}})[0]
    ids = torch.randint(0, 32, (2, 8))
    for _ in range(2):
        engine.backward(engine(ids).float().pow(2).mean())
        engine.step()
        ref.zero_grad()
        plain(ids).float().pow(2).mean().backward()
        ref.step()
    for (n, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
