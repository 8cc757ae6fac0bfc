"""Recompute gives the same loss and gradients as keeping activations, dropout included."""

import pytest
import torch

import shardspeed
from shardspeed import checkpointing
from tests.distributed.workloads import tiny_gpt


@pytest.fixture(autouse=True)
def _defaults():
    checkpointing.reset()
    yield
    checkpointing.reset()


def _loss_and_grads(model, recompute, seed=7):
    torch.manual_seed(seed)
    x = torch.randint(0, model.c.vocab, (3, 16))
    y = torch.randint(0, model.c.vocab, (3, 16))
    h = model.tok(x) + model.pos(torch.arange(16))
    for blk in model.blocks:
        h = checkpointing.checkpoint(blk, h) if recompute else blk(h)
    loss = torch.nn.functional.cross_entropy(model.head(model.ln(h)).view(-1, model.c.vocab), y.reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()
    after = torch.rand(1)  # the RNG stream continues as if nothing was recomputed
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, after


@pytest.mark.parametrize("in_cpu", [False, True])
def test_recompute_equals_keeping_activations_with_dropout(in_cpu):
    checkpointing.configure(None, checkpoint_in_cpu=in_cpu)
    model = tiny_gpt(dropout=0.3)
    model.train()
    loss0, g0, r0 = _loss_and_grads(model, recompute=False)
    loss1, g1, r1 = _loss_and_grads(model, recompute=True)
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=0)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-6, atol=1e-7), n
    assert torch.equal(r0, r1)


def test_dropout_differs_without_rng_restore_so_the_test_can_fail():
    model = tiny_gpt(dropout=0.3)
    model.train()
    loss0, _, _ = _loss_and_grads(model, recompute=False, seed=7)
    loss1, _, _ = _loss_and_grads(model, recompute=False, seed=8)
    assert loss0 != loss1


def test_configure_from_the_config_section_and_arguments_win():
    cfg = {"activation_checkpointing": {"cpu_checkpointing": True, "profile": True}}
    checkpointing.configure(None, deepspeed_config=cfg)
    s = checkpointing._settings
    assert s.in_cpu and s.profile
    checkpointing.configure(None, deepspeed_config=cfg, checkpoint_in_cpu=False)
    assert not checkpointing._settings.in_cpu


def test_profile_counts_forward_and_recompute_time():
    checkpointing.configure(None, profile=True)
    model = tiny_gpt()
    _loss_and_grads(model, recompute=True)
    t = checkpointing.profile_timings()
    assert t["forward"] > 0 and t["recompute"] > 0


def test_error_messages():
    with pytest.raises(ValueError, match="needs partition_activations=True"):
        checkpointing.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    with pytest.raises(ValueError, match="needs num_checkpoints"):
        checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True)
    checkpointing.configure(None, checkpoint_in_cpu=True)
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="none of them requires grad"):
        checkpointing.checkpoint(lin, torch.randn(2, 4))


def test_the_deepspeed_import_path():
    import importlib

    mod = importlib.import_module("shardspeed.checkpointing")
    assert mod is shardspeed.checkpointing and callable(mod.checkpoint) and callable(mod.configure)


def test_more_live_checkpoints_than_num_checkpoints_is_an_error_naming_the_fix():
    checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True, num_checkpoints=1)
    lin = torch.nn.Linear(4, 4)
    h = checkpointing.checkpoint(lin, torch.randn(2, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="more than num_checkpoints=1 checkpoint.. regions are alive at once; "
                                           "raise num_checkpoints"):
        checkpointing.checkpoint(lin, h)
