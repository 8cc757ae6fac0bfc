"""``zero.Init``'s placement arguments in one process: dtype, remote_device, pin_memory, and the
errors for what is not supported."""

from __future__ import annotations

import pytest
import torch

import shardspeed
from shardspeed.accelerator.device import Accelerator
from tests.distributed.workloads import max_rel_diff, micro_slices, reference_run, tiny_gpt

CONFIG = {"train_batch_size": 4, "steps_per_print": None, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}}


def test_dtype_builds_the_parameters_in_that_dtype():
    ref = tiny_gpt()
    with shardspeed.zero.Init(dtype=torch.bfloat16):
        model = tiny_gpt()
    chunks = 0
    for (name, p), r in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert p.dtype == torch.bfloat16, name
        # in one process some parameters end whole (re-initialised after their cut): either form counts
        value = p.ds_chunk[:p.ds_numel] if hasattr(p, "ds_chunk") else p.detach().reshape(-1)
        chunks += hasattr(p, "ds_chunk")
        assert value.dtype == torch.bfloat16 and torch.equal(value, r.detach().reshape(-1).to(torch.bfloat16)), name
    assert chunks > 0


def test_remote_device_cpu_keeps_chunks_on_the_host_and_trains_like_plain_pytorch():
    with shardspeed.zero.Init(remote_device="cpu", pin_memory=True, config_dict_or_path=CONFIG):
        model = tiny_gpt()
    chunks = [p.ds_chunk for p in model.parameters() if hasattr(p, "ds_chunk")]
    assert chunks and all(c.device.type == "cpu" for c in chunks)
    engine, *_ = shardspeed.initialize(model=model, config=CONFIG)
    for step in range(3):
        for x, y in micro_slices(step, 0, 1, 4, 1):
            engine.backward(engine(x, y))
            engine.step()
    ours = {n: p.detach().float().clone() for n, p in engine.module.state_dict().items()}
    ref = reference_run(3, 4, 3e-3, 0.01, 0.0)["params"]
    assert max_rel_diff({n: ours[n] for n in ref}, ref) < 1e-5


def test_pin_memory_pins_host_chunks_through_the_accelerator(monkeypatch):
    pinned = []

    def fake_pin(self, t):
        pinned.append(t.data_ptr())
        return t

    monkeypatch.setattr(Accelerator, "pin_memory", fake_pin)
    with shardspeed.zero.Init(remote_device="cpu", pin_memory=True):
        model = tiny_gpt()
    kept = [p.ds_chunk.data_ptr() for p in model.parameters() if hasattr(p, "ds_chunk")]
    assert kept and set(kept) <= set(pinned)


@pytest.mark.parametrize("device", ["nvme", "NVMe"])
def test_nvme_builds_chunks_on_the_host_for_offload_param_to_take(device):
    # the shards go to disk at initialize() with offload_param nvme (tests/distributed/test_offload.py)
    assert shardspeed.zero.Init(remote_device=device).remote_device == "cpu"


def test_unknown_remote_device_names_the_choices():
    with pytest.raises(ValueError, match=r"remote_device='tpu'.*expected None, 'cpu', 'nvme' or 'cuda'"):
        shardspeed.zero.Init(remote_device="tpu")
