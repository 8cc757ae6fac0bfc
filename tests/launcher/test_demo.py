"""`make demo` keeps working: a short run writes the plot and the summary."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_short_run(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "examples/gpt_demo.py",
                        "--deepspeed_config", "examples/ds_config.json", "--out", str(out), "--steps", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = (out / "summary.txt").read_text()
    assert "steps 6, batch 32 x 128 chars, 2 ranks, precision bf16" in summary
    assert "rank 1: peak RSS" in summary
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.pt").stat().st_size > 1_000_000
    assert (out / "checkpoint" / "latest").read_text() == "global_step6"
