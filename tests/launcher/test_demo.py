"""`make demo` keeps working: a short run writes the plot and the summary, says what it trains before
the first step, reports progress from step 1, and takes bf16 only where the CPU computes it natively
(``"bf16": {"enabled": "auto"}``; SHARDSPEED_NATIVE_BF16 plays either kind of CPU)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("native, precision, said", [
    ("1", "bf16", "bf16: auto -> bf16: this CPU computes bf16 natively (SHARDSPEED_NATIVE_BF16=1)"),
    ("0", "fp32", "bf16: auto -> fp32: this CPU has no native bf16 (SHARDSPEED_NATIVE_BF16=0); "
                  "emulated bf16 would run ~100x slower than fp32"),
])
def test_demo_short_run(tmp_path, native, precision, said):
    out = tmp_path / "demo"
    env = {**os.environ, "SHARDSPEED_NATIVE_BF16": native}
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
