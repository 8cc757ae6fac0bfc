"""ZeRO stages 1 and 2 on 2 and 3 real ranks against plain single-process PyTorch."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import (
    LOW_PRECISION_TOL,
    ODD,
    engine_run,
    max_rel_diff,
    model_rel_diff,
    reference_run,
    tiny_gpt,
)

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}


def _config(stage, world, **extra):
    return {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW,
            "gradient_clipping": 0.3, "steps_per_print": None,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 700}, **extra}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_parity_fp32_odd_sizes_tied_embedding_accumulation_clipping(stage, world):
    steps = 4
    ranks = run_ranks(engine_run, world, _config(stage, world), steps, ODD)
    ref = reference_run(steps, 4 * world, 3e-3, 0.01, 0.3, ODD)
    assert "head.weight" not in ref["params"]  # tied to tok.weight: one parameter
    for r in ranks:
        assert max_rel_diff(r["params"], ref["params"]) < 1e-5
        assert r["global_steps"] == steps and r["micro_steps"] == 2 * steps


def _lamb_cfg(world):
    lamb = {"type": "Lamb", "params": {"lr": 2e-2, "weight_decay": 0.01, "max_coeff": 0.5, "min_coeff": 0.08,
                                       "max_grad_norm": 1.0, "bias_correction": False}}
    return {**_config(2, world), "optimizer": lamb, "gradient_clipping": 0.0}


def test_zero_lamb_equals_single_rank_lamb():
    from shardspeed.optim import FusedLamb

    steps = 4
    ranks = run_ranks(engine_run, 2, _lamb_cfg(2), steps, ODD)
    ref = reference_run(steps, 8, 0, 0, 0.0, ODD, make_opt=lambda p: FusedLamb(
        p, lr=2e-2, weight_decay=0.01, max_coeff=0.5, min_coeff=0.08, max_grad_norm=1.0, bias_correction=False))
    assert max_rel_diff(ranks[0]["params"], ref["params"]) < 1e-5
    # the trust ratio was per full parameter: a per-shard ratio gives another result
    assert max_rel_diff(ranks[0]["params"], reference_run(steps, 8, 2e-2, 0.01, 0.0, ODD)["params"]) > 1e-3


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_and_fp16_track_fp32(stage):
    steps = 6
    fp32 = run_ranks(engine_run, 2, _config(stage, 2), steps)
    for extra in ({"bf16": {"enabled": True}}, {"fp16": {"enabled": True, "initial_scale_power": 8}}):
        low = run_ranks(engine_run, 2, _config(stage, 2, **extra), steps)
        assert low[0]["skipped"] == 0
        # the parameters, not a loss: relative distance of the low-precision run from fp32
        assert model_rel_diff(low[0]["params"], fp32[0]["params"]) < LOW_PRECISION_TOL
        assert max_rel_diff(low[0]["params"], low[1]["params"]) == 0.0


@pytest.mark.parametrize("stage", [1, 2])
def test_memory_and_comm_volume_match_theory(stage):
    steps = 2
    cfg = _config(stage, 2, gradient_accumulation_steps=1, train_batch_size=4, comms_logger={"enabled": True},
                  zero_optimization={"stage": stage, "reduce_bucket_size": 5000})
    r0, _ = run_ranks(engine_run, 2, cfg, steps)
    n = sum(p.numel() for p in tiny_gpt().parameters())
    mem = r0["memory"]
    assert mem["master_parameters"] == 0  # fp32: the shard is a view of the parameters
    assert mem["parameters"] == pytest.approx(4 * n, rel=0.01)
    assert mem["optimizer_states"] == pytest.approx(8 * n / 2, rel=0.02)
    expected_grads = 4 * n if stage == 1 else 4 * n / 2
    assert mem["gradients"] == pytest.approx(expected_grads, rel=0.02)
    # per step: reduce-scatter the gradients and all-gather the parameters once each (2 x 4 bytes x n)
    per_step = (r0["comm_bytes"]["reduce_scatter"] + r0["comm_bytes"]["all_gather"]) / steps
    assert per_step == pytest.approx(2 * 4 * n, rel=0.02)


def _no_sync_stage2(rank):
    import shardspeed
    from tests.distributed.workloads import micro_slices, tiny_gpt

    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config=_config(2, 2))
    (x, y), _ = micro_slices(0, rank, 2, 2, 2)
    with engine.no_sync():
        try:
            engine.backward(engine(x, y))
        except RuntimeError as e:
            return str(e)
    return ""


def test_no_sync_with_stage2_explains_itself():
    msg = run_ranks(_no_sync_stage2, 2)[0]
    assert "no_sync() is not supported with ZeRO stage 2" in msg


def test_untested_client_optimizer_is_refused_with_a_way_out():
    import shardspeed
    from shardspeed.config import ConfigError

    class Mine(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            pass

    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": 1}, "steps_per_print": None}
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="Mine has not been tested with ZeRO stage 1.*zero_allow_untested_optimizer"):
        shardspeed.initialize(model=model, optimizer=Mine(model.parameters()), config=cfg)
    model = tiny_gpt()
    shardspeed.initialize(model=model, optimizer=Mine(model.parameters()),
                          config={**cfg, "zero_allow_untested_optimizer": True})


@pytest.mark.parametrize("options", [
    {"reduce_scatter": False},
    {"allgather_partitions": False, "allgather_bucket_size": 300},
    {"overlap_comm": False},  # (contiguous_gradients: false is rejected: buckets are always contiguous)
    {"overlap_comm": True},
])
def test_zero_options_keep_parity(options):
    steps = 3
    cfg = _config(2, 2)
    cfg["zero_optimization"] = {**cfg["zero_optimization"], **options}
    ranks = run_ranks(engine_run, 2, cfg, steps, ODD)
    ref = reference_run(steps, 8, 3e-3, 0.01, 0.3, ODD)
    assert max_rel_diff(ranks[1]["params"], ref["params"]) < 1e-5


def _stage2_borrowed(rank, bucket_numel):
    """Largest number of full-size gradient elements stage 2 holds at once, and what it keeps at rest."""
    import shardspeed
    from shardspeed.zero.sharded import ShardedBucket
    from tests.distributed.workloads import micro_slices

    state = {"now": 0, "peak": 0}
    borrow, give_back = ShardedBucket.ensure_full, ShardedBucket.release_full

    def ensure_full(self):
        if self.grad_full is None and not self.keep_full_grads:
            state["now"] += self.splan.padded
            state["peak"] = max(state["peak"], state["now"])
        return borrow(self)

    def release_full(self):
        state["now"] -= self.splan.padded
        give_back(self)

    ShardedBucket.ensure_full, ShardedBucket.release_full = ensure_full, release_full
    cfg = {**_config(2, 2), "zero_optimization": {"stage": 2, "reduce_bucket_size": bucket_numel}}
    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config=cfg)
    for step in range(2):
        for x, y in micro_slices(step, rank, 2, 2, 2):
            engine.backward(engine(x, y))
            engine.step()
    total = sum(b.splan.padded for b in engine.strategy.buckets)
    return {"peak": state["peak"], "total": total, "largest": max(b.splan.padded for b in engine.strategy.buckets),
            "at_rest": engine.memory_breakdown()["temporary_buffers"],
            "pool_peak": engine.strategy._pool.peak_allocated}


def test_stage2_bounds_the_gradient_buckets_it_borrows():
    for r in run_ranks(_stage2_borrowed, 2, 700):
        # the reduce_bucket_size window plus the bucket being filled, never the whole model's gradients
        assert r["peak"] <= 700 + 2 * r["largest"] < r["total"], r
        # every buffer alive, borrowed or pooled (buckets of many sizes must not pile up in the pool)
        assert r["pool_peak"] <= 4 * (2 * 700 + 2 * r["largest"]) < 4 * r["total"], r
        assert r["at_rest"] == 0  # the pool is emptied at step(): at rest a rank holds its shards only
