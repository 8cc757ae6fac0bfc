"""examples/rscan trains on 2 ranks through the launcher (tiny vocabulary, the stdlib corpus, a few
steps): it reports held-out AUC to stdout, auc.jsonl and the CSV monitor; its range-test mode writes
the plot and prints a OneCycle range."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One mined-pairs cache for the module's runs: the stdlib is parsed once (~3 s), not per test."""
    return tmp_path_factory.mktemp("rscan_cache")


def _run(tmp_path, cache, *extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "shardspeed.launcher", "--num_procs", "2", "examples/rscan/train.py",
           "--deepspeed_config", "examples/rscan/ds_config.json", "--corpus", "stdlib", "--vocab", "3000",
           "--eval_limit", "120", "--data_cache", str(cache), "--out", str(out), *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


@pytest.mark.parametrize("grads", ["sparse", "dense"])
def test_rscan_trains_and_reports_auc(tmp_path, cache, grads):
    out, stdout = _run(tmp_path, cache, "--grads", grads, "--steps", "6", "--eval_every", "3")
    assert f"embedding 3000 x 64, {grads} gradients" in stdout
    assert "6 steps of 128 queries on 2 ranks, ZeRO stage 0" in stdout
    curve = [json.loads(line) for line in (out / "auc.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 3, 6] and [r["samples"] for r in curve] == [0, 384, 768]
    assert all(0.0 <= r["auc"] <= 1.0 for r in curve) and curve[-1]["train_s"] > 0
    assert f"step 6/6 held-out AUC {curve[-1]['auc']:.4f}" in stdout
    monitor = (out / "monitor" / "rscan" / "Eval_Samples_auc.csv").read_text().splitlines()
    assert monitor[0] == "step,value" and [line.split(",")[0] for line in monitor[1:]] == ["0", "384", "768"]


def test_rscan_sparse_at_zero_stage_2_scores_as_at_stage_0(tmp_path, cache):
    """The example at ZeRO 2 (sparse=True table kept partitioned, lazy Adam) gives the held-out AUC of
    stage 0 at every evaluation: the stage changes where state lives, not the model."""
    curves = []
    for stage in ("0", "2"):
        out, stdout = _run(tmp_path / stage, cache, "--steps", "6", "--eval_every", "3", "--zero_stage", stage)
        assert f"ZeRO stage {stage}" in stdout
        curves.append([json.loads(line)["auc"] for line in (out / "auc.jsonl").read_text().splitlines()])
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], abs=1e-6)
    assert curves[0][0] != curves[0][-1]  # the model moved


def test_rscan_range_test_says_when_there_is_nothing_to_read(tmp_path, cache):
    """12 steps do not leave the initial plateau (loss ~0.693): the run says so and what to change,
    instead of suggesting a range read from noise. The suggestion itself: tests/unit/test_rscan.py."""
    with pytest.raises(AssertionError) as failed:
        _run(tmp_path, cache, "--steps", "12", "--eval_every", "100", "--range_test", "1e-4,1e-1")
    said = str(failed.value)
    assert ("LR range test --range_test 1e-4,1e-1 over 12 steps: range test: the smoothed loss never fell by 2 %"
            in said), said
    assert "sweep over more steps, or from a lower lr to a lower maximum" in said
    assert "Traceback" not in said
