"""The planner against what the engine counts on its own tensors (``engine.memory_breakdown()``):
model states at stages 1-3, and stage 3's transient high-water mark, on 2 real ranks."""

import pytest
import torch

from tests.distributed.harness import run_ranks

ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
WIDTH, LAYERS = 100, 4


def _config(stage):
    return {"train_batch_size": 4, "optimizer": ADAMW, "steps_per_print": None,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 25_000,
                                  "stage3_param_persistence_threshold": 0}}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _counted(rank):
    import shardspeed

    out = {}
    for stage in (1, 2, 3):
        engine, *_ = shardspeed.initialize(model=_model(), config=_config(stage))
        for step in range(3):
            x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(10 * step + rank))
            engine.backward(engine(x).square().mean())
            engine.step()
        out[stage] = engine.memory_breakdown()
    return out


@pytest.mark.world_size(2)
def test_planned_model_states_and_stage3_transient_equal_the_counted_bytes():
    from shardspeed.zero.planner import load_plan_config, make_plan, settings_from_config, spec_from_module

    counted = run_ranks(_counted, 2)
    for stage in (1, 2, 3):
        cfg, off = load_plan_config(_config(stage))
        s = settings_from_config(cfg, 2, offload=off)
        plan = make_plan(spec_from_module(_model(), s.z3), s)
        mine = counted[0][stage]
        states = mine["parameters"] + mine["gradients"] + mine["master_parameters"] + mine["optimizer_states"]
        # the optimizer's 0-dim ``step`` tensors (4 B per master tensor) are the only difference
        assert 0 <= states - plan.total("model states", "device") <= 4 * 2 * LAYERS, stage
        if stage == 3:
            planned = sum(i.nbytes for i in plan.items if i.group == "transient" and i.phase == "backward"
                          and i.role != "autograd")  # autograd's own gradient is not the strategy's to count
            assert mine["peak_transient"] == planned
