"""``"bf16": {"enabled": "auto"}``: bf16 only where the device computes it natively, and what the
user reads when it falls back or when bf16 is forced on a CPU that emulates it."""

import io
import logging

import pytest
import torch

import shardspeed
from shardspeed.accelerator import bf16 as acc_bf16
from shardspeed.accelerator import native_bf16
from shardspeed.config import ConfigError, load_config
from shardspeed.precision import policy
from shardspeed.precision.policy import PrecisionPolicy
from tests.distributed.workloads import tiny_gpt


@pytest.fixture
def logged():
    """What rank 0 logs through the "shardspeed" logger, with the say-once memory cleared."""
    policy._said.clear()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    log = logging.getLogger("shardspeed")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield buf
    log.removeHandler(handler)
    log.setLevel(old_level)
    policy._said.clear()


@pytest.fixture
def fresh_detection():
    acc_bf16._cpu_bf16.cache_clear()
    yield
    acc_bf16._cpu_bf16.cache_clear()


def test_config_accepts_auto_and_keeps_it_unresolved():
    cfg = load_config({"bf16": {"enabled": "auto"}})
    assert cfg.bf16.enabled == "auto" and cfg.compute_dtype_name == "auto"


def test_config_rejects_auto_with_fp16():
    with pytest.raises(ConfigError, match='fp16.enabled is true and bf16.enabled is "auto"; enable one of them'):
        load_config({"bf16": {"enabled": "auto"}, "fp16": {"enabled": True}})


def test_config_rejects_other_strings():
    assert load_config({"bf16": {"enabled": "true"}}).bf16.enabled is True  # pydantic's bool reading stays
    for bad in ("sometimes", 2, [True]):
        with pytest.raises(ConfigError) as e:
            load_config({"bf16": {"enabled": bad}})
        assert str(e.value) == f'bf16.enabled must be true, false or "auto", got {bad!r}'


def test_env_forces_the_answer(monkeypatch):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "0")
    assert native_bf16("cpu") == acc_bf16.Bf16Support(False, "SHARDSPEED_NATIVE_BF16=0")
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "1")
    assert native_bf16("cpu").native
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match=r"SHARDSPEED_NATIVE_BF16='yes': expected 0 \(emulated: use fp32\) or 1"):
        native_bf16("cpu")


@pytest.mark.parametrize("text, flags", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n", {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", {"fp", "asimd", "bf16", "i8mm"}),  # aarch64
    ("processor\t: 0\nmodel name\t: something\n", None),
])
def test_cpu_flags_reads_x86_and_arm_lines(tmp_path, text, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert acc_bf16.cpu_flags(str(path)) == flags
    assert acc_bf16.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("flags, native, reason", [
    ({"avx2", "fma"}, False, "no avx512_bf16/amx_bf16/bf16 CPU flag"),
    ({"avx2", "avx512f", "avx512_bf16"}, True, "CPU flags avx512_bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, True, "CPU flags amx_bf16"),
    ({"asimd", "bf16"}, True, "CPU flags bf16"),
])
def test_cpu_decides_by_flags(monkeypatch, fresh_detection, flags, native, reason):
    monkeypatch.delenv("SHARDSPEED_NATIVE_BF16", raising=False)
    monkeypatch.setattr(acc_bf16, "cpu_flags", lambda: flags)
    monkeypatch.setattr(acc_bf16, "bf16_slowdown", lambda: pytest.fail("flags were available: no timing"))
    got = native_bf16("cpu")
    assert got.native is native and reason in got.reason
    assert f"capability {torch.backends.cpu.get_cpu_capability()}" in got.reason


@pytest.mark.parametrize("ratio, native", [(100.0, False), (0.5, True), (3.0, True)])
def test_cpu_without_flags_times_a_matmul(monkeypatch, fresh_detection, ratio, native):
    monkeypatch.delenv("SHARDSPEED_NATIVE_BF16", raising=False)
    monkeypatch.setattr(acc_bf16, "cpu_flags", lambda: None)
    monkeypatch.setattr(acc_bf16, "bf16_slowdown", lambda: ratio)
    got = native_bf16("cpu")
    assert got.native is native and f"a bf16 matmul took {ratio:.1f}x the time of fp32" in got.reason


def test_detection_is_cached(monkeypatch, fresh_detection):
    monkeypatch.delenv("SHARDSPEED_NATIVE_BF16", raising=False)
    calls = []
    monkeypatch.setattr(acc_bf16, "cpu_flags", lambda: calls.append(1) or {"avx2"})
    native_bf16("cpu")
    native_bf16("cpu")
    assert len(calls) == 1


def test_bf16_slowdown_measures_a_positive_ratio():
    assert acc_bf16.bf16_slowdown(n=32, reps=1) > 0


def test_auto_falls_back_to_fp32_and_says_so_once(monkeypatch, logged):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "0")
    cfg = load_config({"bf16": {"enabled": "auto"}})
    for _ in range(2):
        pol = PrecisionPolicy.from_config(cfg, "cpu")
        assert pol.compute == torch.float32 and pol.compute_name == "fp32" and not pol.needs_master_copy
    assert logged.getvalue() == ("bf16: auto -> fp32: this CPU has no native bf16 (SHARDSPEED_NATIVE_BF16=0); "
                                 "emulated bf16 would run ~100x slower than fp32\n")


def test_auto_picks_bf16_where_native(monkeypatch, logged):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "1")
    pol = PrecisionPolicy.from_config(load_config({"bf16": {"enabled": "auto"}}), "cpu")
    assert pol.compute == torch.bfloat16 and pol.compute_name == "bf16"
    assert logged.getvalue() == "bf16: auto -> bf16: this CPU computes bf16 natively (SHARDSPEED_NATIVE_BF16=1)\n"


def test_forced_bf16_on_an_emulating_cpu_warns_once(monkeypatch, logged):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "0")
    cfg = load_config({"bf16": {"enabled": True}})
    for _ in range(2):
        assert PrecisionPolicy.from_config(cfg, "cpu").compute == torch.bfloat16
    assert logged.getvalue() == (
        "bf16.enabled is true but this CPU has no native bf16 (SHARDSPEED_NATIVE_BF16=0): bf16 is emulated and "
        "will run ~100x slower than fp32. Set \"bf16\": {\"enabled\": \"auto\"} to use bf16 only where the "
        "hardware computes it, or turn bf16 off to train in fp32\n")


def test_forced_bf16_on_a_native_cpu_says_nothing(monkeypatch, logged):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", "1")
    assert PrecisionPolicy.from_config(load_config({"bf16": {"enabled": True}}), "cpu").compute == torch.bfloat16
    assert logged.getvalue() == ""


def test_fp32_and_fp16_never_ask_the_device(monkeypatch, logged):
    monkeypatch.setattr(policy, "native_bf16", lambda *a: pytest.fail("asked the device for an fp32/fp16 config"))
    assert PrecisionPolicy.from_config(load_config({}), "cpu").compute == torch.float32
    assert PrecisionPolicy.from_config(load_config({"fp16": {"enabled": True}}), "cpu").compute == torch.float16


def test_cuda_asks_torch(monkeypatch):
    monkeypatch.delenv("SHARDSPEED_NATIVE_BF16", raising=False)
    acc_bf16._cuda_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    try:
        got = native_bf16("cuda")
    finally:
        acc_bf16._cuda_bf16.cache_clear()
    assert got == acc_bf16.Bf16Support(False, "torch.cuda.is_bf16_supported() is False")


@pytest.mark.parametrize("native, dtype", [("0", torch.float32), ("1", torch.bfloat16)])
def test_engine_trains_in_the_resolved_dtype(monkeypatch, logged, native, dtype):
    monkeypatch.setenv("SHARDSPEED_NATIVE_BF16", native)
    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config={
        "train_batch_size": 2, "steps_per_print": None, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert engine.policy.compute == dtype
    assert {p.dtype for p in engine.module.parameters()} == {dtype}
