"""The planner against what the engine counts on its own tensors (``engine.memory_breakdown()``):
model states at stages 1-3, stage 3's transient high-water mark, and with offload to disk the
swap buffers and files, on 2 real ranks."""

import pytest
import torch

from tests.distributed.harness import run_ranks

ADAMW = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
WIDTH, LAYERS = 100, 4


def _config(stage, offload=None, path=None):
    zero = {"stage": stage, "reduce_bucket_size": 25_000, "stage3_param_persistence_threshold": 0}
    if offload in ("optimizer", "both"):  # two sub-groups (stages 1-2: a bucket each; stage 3: two units each)
        zero.update(offload_optimizer={"device": "nvme", "nvme_path": path, "buffer_count": 2},
                    sub_group_size=10_150)
    if offload in ("params", "both"):  # 4 units of 5,050 elements on disk, read through 2 buffers
        zero.update(offload_param={"device": "nvme", "nvme_path": path, "buffer_count": 2, "buffer_size": 5_050})
    return {"train_batch_size": 4, "optimizer": ADAMW, "steps_per_print": None, "zero_optimization": zero}


RUNS = [(1, None), (2, None), (3, None), (2, "optimizer"), (3, "params"), (3, "both")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _counted(rank, path):
    import shardspeed

    out = {}
    for stage, offload in RUNS:
        engine, *_ = shardspeed.initialize(model=_model(), config=_config(stage, offload, path))
        for step in range(2):  # stage 3 prefetches from the second step on
            x = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(10 * step + rank))
            engine.backward(engine(x).square().mean())
            engine.step()
        out[stage, offload] = engine.memory_breakdown()
    return out


@pytest.mark.slow  # 6 engines on 2 ranks: ~28 s at load 6 on the 2 cores (9 s of CPU)
@pytest.mark.world_size(2)
def test_planned_bytes_equal_the_counted_bytes_with_and_without_offload(tmp_path):
    from shardspeed.zero.planner import load_plan_config, make_plan, settings_from_config, spec_from_module

    counted = run_ranks(_counted, 2, str(tmp_path))
    for stage, offload in RUNS:
        cfg, off = load_plan_config(_config(stage, offload, str(tmp_path)))
        s = settings_from_config(cfg, 2, offload=off)
        plan = make_plan(spec_from_module(_model(), s.z3), s)
        mine = counted[0][stage, offload]

        def planned(role, tier="device", plan=plan):
            return sum(i.nbytes for i in plan.items if i.role == role and i.group == "model states" and i.tier == tier)

        states = mine["parameters"] + mine["gradients"] + mine["master_parameters"] + mine["optimizer_states"]
        # the optimizer's 0-dim ``step`` tensors (4 B per master tensor) are the only difference
        assert 0 <= states - plan.total("model states", "device") <= 4 * 2 * LAYERS, (stage, offload)
        assert mine["master_parameters"] == planned("master"), (stage, offload)
        if offload in ("optimizer", "both"):
            swap = sum(i.nbytes for i in plan.items if i.what.startswith("optimizer ring"))
            assert mine["offload_buffers"] == swap
            assert mine["optimizer_states_on_disk"] == planned("optim", tier="disk")
        if offload in ("params", "both"):
            reads = sum(i.nbytes for i in plan.items if i.what.startswith("parameter read buffers"))
            assert mine["param_offload_buffers"] == reads
            assert mine["parameters_on_disk"] == planned("param_shard", tier="disk")
        if stage == 3 and offload is None:
            transient = sum(i.nbytes for i in plan.items if i.group == "transient" and i.phase == "backward"
                            and i.role != "autograd")  # autograd's own gradient is not the strategy's to count
            assert mine["peak_transient"] == transient
