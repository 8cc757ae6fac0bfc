"""The planner against what the engine counts on its own tensors (``engine.memory_breakdown()``):
model states at stages 1-3, stage 3's transient high-water mark, and with the optimizer state on
disk the swap ring and the file, on 2 real ranks."""

import pytest
import torch

from tests.distributed.harness import run_ranks

ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
WIDTH, LAYERS = 100, 4


def _config(stage, nvme=None):
    zero = {"stage": stage, "reduce_bucket_size": 25_000, "stage3_param_persistence_threshold": 0}
    if nvme:  # two sub-groups (one per bucket: 10,150 and 10,050 elements), a ring of two buffers
        zero.update(offload_optimizer={"device": "nvme", "nvme_path": nvme, "buffer_count": 2},
                    sub_group_size=10_150)
    return {"train_batch_size": 4, "optimizer": ADAMW, "steps_per_print": None, "zero_optimization": zero}


RUNS = [(1, None), (2, None), (3, None), (2, "nvme")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _counted(rank, path):
    import shardspeed

    out = {}
    for stage, nvme in RUNS:
        engine, *_ = shardspeed.initialize(model=_model(), config=_config(stage, nvme and path))
        for step in range(3):
            x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(10 * step + rank))
            engine.backward(engine(x).square().mean())
            engine.step()
        out[stage, nvme] = engine.memory_breakdown()
    return out


@pytest.mark.world_size(2)
def test_planned_model_states_and_stage3_transient_equal_the_counted_bytes(tmp_path):
    from shardspeed.zero.planner import load_plan_config, make_plan, settings_from_config, spec_from_module

    counted = run_ranks(_counted, 2, str(tmp_path))
    for stage, nvme in RUNS:
        cfg, off = load_plan_config(_config(stage, nvme and str(tmp_path)))
        s = settings_from_config(cfg, 2, offload=off)
        plan = make_plan(spec_from_module(_model(), s.z3), s)
        mine = counted[0][stage, nvme]
        states = mine["parameters"] + mine["gradients"] + mine["master_parameters"] + mine["optimizer_states"]
        # the optimizer's 0-dim ``step`` tensors (4 B per master tensor) are the only difference
        assert 0 <= states - plan.total("model states", "device") <= 4 * 2 * LAYERS, (stage, nvme)
        if nvme:
            assert mine["offload_buffers"] == plan.total("buffers", "device")
            assert mine["optimizer_states_on_disk"] == plan.peak("disk")
        if stage == 3:
            planned = sum(i.nbytes for i in plan.items if i.group == "transient" and i.phase == "backward"
                          and i.role != "autograd")  # autograd's own gradient is not the strategy's to count
            assert mine["peak_transient"] == planned
