"""Stage 0 (DDP-equivalent) on real ranks against plain single-process PyTorch."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import (
    LOW_PRECISION_TOL,
    engine_run,
    max_rel_diff,
    micro_slices,
    model_config,
    model_rel_diff,
    reference_run,
    tiny_gpt,
)

pytestmark = pytest.mark.world_size(2)

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}


def _config(**extra):
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW,
            "gradient_clipping": 0.3, "steps_per_print": None, **extra}


def test_parity_fp32_accumulation_and_clipping():
    steps = 6
    ranks = run_ranks(engine_run, 2, _config(), steps)
    ref = reference_run(steps, global_batch=8, lr=3e-3, weight_decay=0.01, clip=0.3)
    for r in ranks:
        assert r["global_steps"] == steps and r["micro_steps"] == steps * 2
        assert max_rel_diff(r["params"], ref["params"]) < 1e-5
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean_losses == pytest.approx(ref["losses"], rel=1e-5)
    # clipping was active: without it the result differs
    unclipped = reference_run(steps, global_batch=8, lr=3e-3, weight_decay=0.01, clip=0.0)
    assert max_rel_diff(ranks[0]["params"], unclipped["params"]) > 1e-4


def test_small_buckets_and_no_overlap_give_the_same_result():
    steps = 3
    cfg = _config(zero_optimization={"stage": 0, "reduce_bucket_size": 1000, "overlap_comm": False})
    ranks = run_ranks(engine_run, 2, cfg, steps)
    ref = reference_run(steps, global_batch=8, lr=3e-3, weight_decay=0.01, clip=0.3)
    assert max_rel_diff(ranks[1]["params"], ref["params"]) < 1e-5


def test_bf16_and_fp16_track_fp32():
    steps = 8
    fp32 = run_ranks(engine_run, 2, _config(), steps)[0]
    bf16 = run_ranks(engine_run, 2, _config(bf16={"enabled": True}), steps)
    fp16 = run_ranks(engine_run, 2, _config(fp16={"enabled": True, "initial_scale_power": 8}), steps)
    for run in (bf16, fp16):
        # the parameters, not a loss: relative distance of the low-precision run from fp32
        assert model_rel_diff(run[0]["params"], fp32["params"]) < LOW_PRECISION_TOL
        assert run[0]["skipped"] == 0
        # replicas stay identical
        assert max_rel_diff(run[0]["params"], run[1]["params"]) == 0.0
    assert fp32["losses"][-1] < fp32["losses"][0]
    # masters and gradient buffers are fp32, module parameters bf16 (2 bytes) in bf16 mode
    mem = bf16[0]["memory"]
    assert mem["master_parameters"] == 2 * mem["parameters"]
    assert mem["gradients"] == 2 * mem["parameters"]


def test_prescale_and_communication_dtype():
    steps = 3
    cfg = _config(prescale_gradients=True, gradient_predivide_factor=2.0)
    ranks = run_ranks(engine_run, 2, cfg, steps)
    ref = reference_run(steps, global_batch=8, lr=3e-3, weight_decay=0.01, clip=0.3)
    assert max_rel_diff(ranks[0]["params"], ref["params"]) < 1e-5
    bf16_wire = run_ranks(engine_run, 2, _config(communication_data_type="bf16"), steps)
    # bf16 on the wire rounds the gradients (so the result differs) but training still tracks fp32
    assert max_rel_diff(bf16_wire[0]["params"], ref["params"]) > 0
    assert max_rel_diff(bf16_wire[0]["params"], bf16_wire[1]["params"]) == 0
    final = (bf16_wire[0]["losses"][-1] + bf16_wire[1]["losses"][-1]) / 2
    assert final == pytest.approx(ref["losses"][-1], rel=1e-2)


def _overflow_worker(rank):
    import shardspeed
    from tests.distributed.workloads import micro_slices, tiny_gpt

    model = tiny_gpt()
    cfg = {"train_batch_size": 4, "optimizer": ADAMW, "steps_per_print": None,
           "fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1}}
    engine, *_ = shardspeed.initialize(model=model, config=cfg)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), = micro_slices(0, rank, 2, 2, 1)
    loss = engine(x, y)
    if rank == 1:  # only one rank overflows; both must skip
        loss = loss * float("inf")
    engine.backward(loss)
    engine.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (x, y), = micro_slices(1, rank, 2, 2, 1)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    changed = not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return {"unchanged": unchanged, "changed": changed, "skipped": engine.skipped_steps,
            "scale": engine.loss_scale, "global_steps": engine.global_steps}


def test_fp16_overflow_on_one_rank_skips_everywhere():
    for r in run_ranks(_overflow_worker, 2):
        assert r == {"unchanged": True, "changed": True, "skipped": 1, "scale": 8.0, "global_steps": 2}


def _no_sync_worker(rank):
    import shardspeed
    from tests.distributed.workloads import micro_slices, tiny_gpt

    model = tiny_gpt()
    cfg = {"train_batch_size": 8, "gradient_accumulation_steps": 2, "optimizer": ADAMW, "steps_per_print": None}
    engine, *_ = shardspeed.initialize(model=model, config=cfg)
    (x0, y0), (x1, y1) = micro_slices(0, rank, 2, 2, 2)
    with engine.no_sync():
        engine.backward(engine(x0, y0))
        local = model.head.weight.grad.clone()
        engine.step()
    engine.backward(engine(x1, y1))
    engine.strategy.wait_reductions()
    reduced = model.head.weight.grad.clone()
    error = ""
    with engine.no_sync():
        try:
            engine.step()
        except RuntimeError as e:
            error = str(e)
    return {"local": local, "reduced": reduced, "error": error}


def test_no_sync_defers_the_reduction():
    r0, r1 = run_ranks(_no_sync_worker, 2)
    assert not torch.equal(r0["local"], r1["local"])  # not reduced inside no_sync
    assert torch.equal(r0["reduced"], r1["reduced"])  # reduced by the first backward outside
    assert "inside no_sync()" in r0["error"]


def _mpu_worker(rank, stage=0):
    import shardspeed
    from tests.distributed.workloads import SplitMPU, micro_slices, tiny_gpt

    shardspeed.init_distributed()  # Megatron-style: groups exist before initialize()
    model = tiny_gpt()
    model.head.weight.model_parallel = True
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW, "steps_per_print": None,
           "zero_optimization": {"stage": stage}}
    engine, *_ = shardspeed.initialize(model=model, config=cfg, mpu=SplitMPU())
    if stage in (1, 2):  # partitions span the data-parallel group (one rank here), not the world
        assert all(b.splan.shard == b.splan.padded for b in engine.strategy.buckets)
    (x, y), = micro_slices(0, rank, 2, 2, 1)
    engine.backward(engine(x, y))
    engine.strategy.wait_reductions()
    norm_sq = engine.strategy.grad_norm_sq().item()
    head_sq = rest_sq = None
    if stage == 0:
        head_sq = model.head.weight.grad.float().norm().item() ** 2
        rest_sq = sum(p.grad.float().norm().item() ** 2 for n, p in model.named_parameters() if n != "head.weight")
    engine.step()
    head = engine.module.state_dict()["head.weight"]
    return {"dp": engine.dp_world_size, "train_batch": engine.train_batch_size(), "head": head,
            "norm_sq": norm_sq, "head_sq": head_sq, "rest_sq": rest_sq}


def test_mpu_data_parallel_group_is_used():
    r0, r1 = run_ranks(_mpu_worker, 2, 0)
    assert r0["dp"] == 1 and r0["train_batch"] == 2
    assert not torch.equal(r0["head"], r1["head"])  # different data, no averaging across the mp group
    # sliced parameter counted on both model-parallel ranks, replicated ones once (on mp rank 0)
    expected = r0["head_sq"] + r1["head_sq"] + r0["rest_sq"]
    assert r0["norm_sq"] == pytest.approx(expected, rel=1e-4)
    assert r1["norm_sq"] == pytest.approx(expected, rel=1e-4)
    for stage in (1, 2, 3):  # ZeRO partitions span the data-parallel group only; same norm, same update
        z0, z1 = run_ranks(_mpu_worker, 2, stage)
        assert z0["norm_sq"] == pytest.approx(expected, rel=1e-4)
        assert torch.allclose(z0["head"], r0["head"], rtol=1e-5, atol=1e-7)
        assert torch.allclose(z1["head"], r1["head"], rtol=1e-5, atol=1e-7)


def _hooks_and_model_zero_grad(rank: int, config: dict, steps: int) -> dict:
    """engine_run with Hugging Face's ``model.zero_grad()`` (set to None) after every step, recording how
    many gradient hooks each micro-batch's backward ran with."""
    import shardspeed

    model = tiny_gpt()
    engine, _, _, _ = shardspeed.initialize(model=model, config=config)
    hooks = []
    for step in range(steps):
        for x, y in micro_slices(step, engine.topo.dp_rank, engine.dp_world_size,
                                 engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                                 model_config()):
            engine.backward(engine(x, y))
            hooks.append(len(engine.strategy._hooks))
            engine.step()
        model.zero_grad()
    names = dict(engine.module.named_parameters())
    return {"params": {n: p.detach().float().clone() for n, p in names.items()}, "hooks": hooks, "n": len(names)}


def test_gradient_hooks_only_on_the_boundary_micro_batch_and_model_zero_grad_between_steps():
    """fp32: hooks only where a reduction overlaps backward (zero/stage0.py, Note: gradient hooks only
    where needed); the gradients autograd makes anew after ``model.zero_grad()`` are linked after
    backward. 4 micro-batches a step: equal to plain PyTorch."""
    steps = 3
    cfg = _config(train_batch_size=16)
    ranks = run_ranks(_hooks_and_model_zero_grad, 2, cfg, steps)
    ref = reference_run(steps, global_batch=16, lr=3e-3, weight_decay=0.01, clip=0.3)
    for r in ranks:
        assert r["hooks"] == [0, 0, 0, r["n"]] * steps
        assert max_rel_diff(r["params"], ref["params"]) < 1e-5
