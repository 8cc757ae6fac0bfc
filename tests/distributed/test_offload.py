"""Optimizer state offloaded to disk (zero/swap_optimizer.py): the same run as without offload, bit
for bit, at ZeRO stages 1-3 with accumulation and clipping; resume from a checkpoint written with
offload; swap files gone when the ranks exit."""

import os

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import ODD, engine_run

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}
STEPS = 10


def _config(stage, offload=None, **zero):
    z = {"stage": stage, "reduce_bucket_size": 700, **zero}
    if offload is not None:
        z["offload_optimizer"] = offload
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW,
            "gradient_clipping": 0.3, "steps_per_print": None, "zero_optimization": z}


def _nvme(path, **extra):
    return {"device": "nvme", "nvme_path": str(path), **extra}


def _runs(rank, configs, steps):
    """Several engines, one after another, in the same ranks (saves a process start per config)."""
    out = []
    for cfg in configs:
        r = engine_run(rank, cfg, steps, ODD)
        out.append({"params": r["params"], "losses": r["losses"], "memory": r["memory"]})
    return out


def _assert_equal(a, b):
    assert a["losses"] == b["losses"]
    for name, t in b["params"].items():
        assert torch.equal(a["params"][name], t), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_to_disk_and_cpu_equal_the_run_without_bit_for_bit(stage, tmp_path):
    # sub-groups of 300 elements: many sub-groups per rank, so the ring of 3 buffers wraps around
    configs = [_config(stage), _config(stage, {"device": "cpu"}),
               _config(stage, _nvme(tmp_path, buffer_count=3), sub_group_size=300)]
    ranks = run_ranks(_runs, 2, configs, STEPS)
    for base, cpu, nvme in ranks:
        _assert_equal(cpu, base)
        _assert_equal(nvme, base)
        assert base["memory"]["optimizer_states"] > 0
        assert nvme["memory"]["optimizer_states"] < base["memory"]["optimizer_states"] / 10  # only `step` left
        assert nvme["memory"]["optimizer_states_on_disk"] >= base["memory"]["optimizer_states"]
    assert os.listdir(tmp_path) == []  # the swap files went with the ranks


def test_part_of_the_state_on_disk_and_sgd_with_momentum(tmp_path):
    sgd = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    configs = [_config(2), _config(2, _nvme(tmp_path, ratio=0.5), sub_group_size=200),
               {**_config(2), "optimizer": sgd}, {**_config(2, _nvme(tmp_path), sub_group_size=200), "optimizer": sgd}]
    for base, half, sgd_base, sgd_nvme in run_ranks(_runs, 2, configs, 4):
        _assert_equal(half, base)
        _assert_equal(sgd_nvme, sgd_base)
        assert 0 < half["memory"]["optimizer_states"] < base["memory"]["optimizer_states"]


def _resume(rank, stage, path, ckpt):
    """4 steps, save, 3 more; then a new engine loads the checkpoint and runs the same 3 steps."""
    import shardspeed
    from tests.distributed.workloads import micro_slices, model_config, tiny_gpt

    def train(engine, steps):
        losses = []
        for step in steps:
            for x, y in micro_slices(step, engine.topo.dp_rank, 2, 2, 2, model_config(**ODD)):
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
        return losses

    cfg = _config(stage, _nvme(path), sub_group_size=250)
    first, *_ = shardspeed.initialize(model=tiny_gpt(**ODD), config=cfg)
    train(first, range(4))
    first.save_checkpoint(str(ckpt))
    tail = train(first, range(4, 7))
    params = {n: p.detach().clone() for n, p in first.module.state_dict().items()}
    first.optimizer_swapper.close()
    second, *_ = shardspeed.initialize(model=tiny_gpt(seed=1, **ODD), config=cfg)
    second.load_checkpoint(str(ckpt))
    again = train(second, range(4, 7))
    resumed = {n: p.detach().clone() for n, p in second.module.state_dict().items()}
    return tail, again, params, resumed


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_checkpoint_written_with_offload(stage, tmp_path):
    swap, ckpt = tmp_path / "swap", tmp_path / "ckpt"
    swap.mkdir()
    for tail, again, params, resumed in run_ranks(_resume, 2, stage, swap, ckpt):
        assert again == tail
        for name, t in params.items():
            assert torch.equal(resumed[name], t), name
    assert os.listdir(swap) == []
