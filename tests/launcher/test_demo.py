"""`make demo` keeps working: a short run writes the plot and the summary, says what it trains before
the first step, reports progress from step 1, and takes bf16 only where the CPU computes it natively
(``"bf16": {"enabled": "auto"}``; SHARDSPEED_NATIVE_BF16 plays either kind of CPU)."""

import os
import subprocess
import sys

import pytest

from shardspeed.accelerator import native_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _said(native: bool, reason: str) -> str:
    if native:
        return f"bf16: auto -> bf16: this CPU computes bf16 natively ({reason})"
    return f"bf16: auto -> fp32: this CPU has no native bf16 ({reason}); emulated bf16 would run ~100x slower than fp32"


# "detected": this CPU's own answer (bf16 with AVX512-BF16/AMX, fp32 on AVX2); "0": plays an AVX2 CPU.
# Never forced to "1": on an AVX2 CPU that is emulated bf16, minutes for these few steps.
@pytest.mark.parametrize("forced", ["detected", "0"])
def test_demo_short_run(tmp_path, monkeypatch, forced):
    monkeypatch.delenv("SHARDSPEED_NATIVE_BF16", raising=False)
    here = native_bf16("cpu")
    if forced == "0" and not here.native:
        pytest.skip("this CPU has no native bf16: the 'detected' run already took the fp32 path")
    env = {k: v for k, v in os.environ.items() if k != "SHARDSPEED_NATIVE_BF16"}
    if forced == "0":
        env["SHARDSPEED_NATIVE_BF16"] = "0"
        said, precision = _said(False, "SHARDSPEED_NATIVE_BF16=0"), "fp32"
    else:
        said, precision = _said(here.native, here.reason), "bf16" if here.native else "fp32"
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "examples/gpt_demo.py",
                        "--deepspeed_config", "examples/ds_config.json", "--out", str(out), "--steps", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    output = p.stdout + p.stderr
    assert output.count(said) == 1, output  # rank 0 only, once
    lines = [line.removeprefix("[rank 0] ") for line in p.stdout.splitlines()]
    intro = next(i for i, line in enumerate(lines) if line.startswith("training a char-GPT of "))
    assert lines[intro].endswith(f"for 6 steps of batch 32 x 64 chars on 2 ranks, precision {precision}")
    assert lines[intro + 1].startswith("step 1/6 loss "), lines[intro:intro + 2]
    summary = (out / "summary.txt").read_text()
    assert f"steps 6, batch 32 x 64 chars, 2 ranks, precision {precision}" in summary
    assert "rank 1: peak RSS" in summary
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.pt").stat().st_size > 500_000
    assert (out / "checkpoint" / "latest").read_text() == "global_step6"
