"""Resuming where the run stopped when the layout changes, and saving without changing the run.

Counters survive a change of (world size, accumulation steps) with the same global batch; a save
between two micro-batches of an accumulation window leaves the training run as it was."""

import itertools
import os

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import max_rel_diff, micro_slices, tiny_gpt

GLOBAL_BATCH = 4
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (world size, gradient_accumulation_steps): micro-batch 1 each


def _config(stage, gas):
    return {"train_batch_size": GLOBAL_BATCH, "gradient_accumulation_steps": gas, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
            "gradient_clipping": 0.5, "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}


def _params(engine):
    names = {n for n, _ in engine.module.named_parameters()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items() if k in names}


def _run(rank, stage, gas, ckpt, first, last, save_at=None, load=False):
    """Steps [first, last) of the same global batches; ``save_at``: save after that many micro-batches."""
    import shardspeed

    world = int(os.environ["WORLD_SIZE"])
    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config=_config(stage, gas))
    if load:
        engine.load_checkpoint(ckpt)
    micro = 0
    for step in range(first, last):
        for x, y in micro_slices(step, engine.topo.dp_rank, world, 1, gas):
            engine.backward(engine(x, y))
            engine.step()
            micro += 1
            if micro == save_at:
                engine.save_checkpoint(ckpt)
    return {"params": _params(engine), "global_steps": engine.global_steps, "micro_steps": engine.micro_steps}


@pytest.mark.parametrize("src, dst", list(itertools.permutations(LAYOUTS, 2)))
def test_resume_at_another_layout_keeps_the_accumulation_boundary(tmp_path, src, dst):
    (w_src, g_src), (w_dst, g_dst) = src, dst
    ckpt = str(tmp_path)
    straight = run_ranks(_run, w_src, 1, g_src, ckpt, 0, 3, 2 * g_src)  # saves after step 2
    resumed = run_ranks(_run, w_dst, 1, g_dst, ckpt, 2, 3, None, True)
    for r in resumed:
        assert r["global_steps"] == 3 and r["micro_steps"] == 3 * g_dst
        # the step after loading used a whole window: the same parameters as the run that never stopped
        assert max_rel_diff(r["params"], straight[0]["params"]) < 1e-5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_save_between_micro_batches_changes_nothing(tmp_path, stage):
    plain = run_ranks(_run, 2, stage, 2, str(tmp_path / "a"), 0, 3)
    saving = run_ranks(_run, 2, stage, 2, str(tmp_path / "b"), 0, 3, 3)  # mid-window of step 1
    for a, b in zip(plain, saving):
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def _loader_run(rank, gas, ckpt, save_at=None, load=False, steps=3):
    """Train on the loader ``initialize()`` returns until ``steps`` global steps."""
    import shardspeed

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 2))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    cfg = {**_config(1, gas), "train_micro_batch_size_per_gpu": 1}
    engine, _, loader, _ = shardspeed.initialize(model=model, config=cfg, training_data=data)
    if load:
        engine.load_checkpoint(ckpt)
    micro = 0
    for x, y in loader:
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        micro += 1
        if micro == save_at:
            engine.save_checkpoint(ckpt)
        if engine.global_steps == steps:
            break
    return _params(engine)


def test_mid_window_resume_at_another_accumulation_rewinds_the_loader(tmp_path):
    """Saved 3 micro-batches in at (2 ranks, 2 per window): the window's first micro-batch was consumed
    but its gradient is not in the checkpoint. Loaded at (1 rank, 4 per window) the window starts
    over, so the loader must serve that micro-batch's samples again: the run then equals the one that
    never stopped (without the rewind it would skip 2 samples and differ)."""
    ckpt = str(tmp_path)
    straight = run_ranks(_loader_run, 2, 2, ckpt, 3)
    resumed = run_ranks(_loader_run, 1, 4, ckpt, None, True)
    assert max_rel_diff(resumed[0], straight[0]) < 1e-5
