"""The accelerator's device mapping and its CPU no-op stream/event/pinned-memory API."""

from __future__ import annotations

import pytest
import torch

from shardspeed.accelerator import Accelerator


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, visible: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_each_local_rank_gets_its_own_gpu(monkeypatch):
    _gpus(monkeypatch, 2, "0,1")
    acc = Accelerator("cuda")
    assert acc.device(0) == torch.device("cuda", 0)
    assert acc.device(1) == torch.device("cuda", 1)


def test_more_local_ranks_than_gpus_is_an_error_not_a_wraparound(monkeypatch):
    _gpus(monkeypatch, 2, "4,5")
    with pytest.raises(RuntimeError) as e:
        Accelerator("cuda").device(2)
    msg = str(e.value)
    assert "LOCAL_RANK=2" in msg and "only 2 CUDA device(s)" in msg and "CUDA_VISIBLE_DEVICES=4,5" in msg


def test_unset_visible_devices_is_named(monkeypatch):
    _gpus(monkeypatch, 1, None)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=1 .*only 1 CUDA.*CUDA_VISIBLE_DEVICES=<unset>"):
        Accelerator("cuda").device(1)


def test_cpu_ranks_all_share_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0, None)
    assert Accelerator("cpu").device(7) == torch.device("cpu")


def test_cpu_streams_and_events_are_no_ops():
    acc = Accelerator("cpu")
    s = acc.new_stream()
    assert s is None and acc.current_stream() is None
    x = torch.ones(3)
    with acc.stream(s):
        y = x * 2
    ev = acc.record_event()
    ev.wait(acc.current_stream())
    ev.synchronize()
    assert ev.query() and torch.equal(y, torch.full((3,), 2.0))
    acc.wait_stream(acc.current_stream(), s)


def test_cpu_pinned_buffers_are_plain_host_tensors(monkeypatch):
    _gpus(monkeypatch, 0, None)
    acc = Accelerator("cpu")
    t = torch.arange(4.0)
    assert acc.pin_memory(t) is t
    buf = acc.empty_pinned(5, dtype=torch.bfloat16)
    assert buf.shape == (5,) and buf.dtype == torch.bfloat16 and buf.device.type == "cpu"
