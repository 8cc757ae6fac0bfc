"""Monitors: TensorBoard events read back with TensorBoard's own reader, CSV files, the progress line,
throughput figures, and the PNG plots made from a run's CSV files."""

import io
import os

import pytest
import torch

import shardspeed
from shardspeed.monitor import ProgressBar
from shardspeed.profiling import Throughput
from shardspeed.utils import plot
from tests.distributed.workloads import tiny_gpt


def _train(tmp_path, steps=4, **extra):
    model = tiny_gpt()
    cfg = {"train_batch_size": 4, "steps_per_print": None,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 3}},
           "tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "job"},
           "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "job"},
           "throughput": {"seq_length": 16, "peak_tflops": 1.0}, **extra}
    engine, *_ = shardspeed.initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, model.c.vocab, (4, 16), generator=g)
        loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.reporter.close()
    return engine, losses


def test_tensorboard_events_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine, losses = _train(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb" / "job"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/samples_per_sec",
                "Train/Samples/tokens_per_sec", "Train/Samples/mfu"):
        assert tag in tags
    loss = acc.Scalars("Train/Samples/train_loss")
    assert [e.step for e in loss] == [4, 8, 12, 16]  # x = samples seen
    assert [e.value for e in loss] == pytest.approx(losses, rel=1e-6)
    lrs = [e.value for e in acc.Scalars("Train/Samples/lr")]
    assert lrs[0] < lrs[-1]  # the warm-up is visible


def test_csv_files_hold_the_same_numbers(tmp_path):
    _, losses = _train(tmp_path)
    path = tmp_path / "csv" / "job" / "Train_Samples_train_loss.csv"
    lines = path.read_text().splitlines()
    assert lines[0] == "step,value"
    assert [float(line.split(",")[1]) for line in lines[1:]] == pytest.approx(losses, rel=1e-12)


def test_fp16_runs_log_the_loss_scale(tmp_path):
    _train(tmp_path, steps=2, fp16={"enabled": True, "initial_scale_power": 8})
    text = (tmp_path / "csv" / "job" / "Train_Samples_loss_scale.csv").read_text()
    assert "256.0" in text


def test_throughput_figures():
    t = Throughput(world_size=2, seq_length=128, peak_tflops=0.5, n_params=1_000_000, dtype=torch.float32)
    r = t.report(samples=8, seconds=2.0)
    assert r["samples_per_sec"] == 4.0 and r["tokens_per_sec"] == 512.0
    assert r["tflops_per_rank"] == pytest.approx(6 * 1e6 * 128 * 8 / 2.0 / 2 / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_rank"] / 0.5)
    t.forward_flops_per_sample = 1e9  # once the profiler measured the forward: 3x it
    assert t.report(8, 2.0)["tflops_per_rank"] == pytest.approx(3e9 * 8 / 2.0 / 2 / 1e12)
    assert "mfu" not in Throughput(1, None, None, 10, torch.float32).report(1, 1.0)


def test_engine_profiles_flops_at_the_profile_step(tmp_path):
    out = tmp_path / "flops.txt"
    engine, _ = _train(tmp_path, steps=3, flops_profiler={"enabled": True, "profile_step": 2,
                                                          "output_file": str(out), "module_depth": 1})
    assert "profile at step 2" in out.read_text()
    assert engine.reporter.throughput.forward_flops_per_sample > 0


def test_progress_bar_line():
    s = io.StringIO()
    bar = ProgressBar(total_steps=10, stream=s)
    bar.write_events([("Train/Samples/train_loss", 1.5, 4), ("Train/Samples/samples_per_sec", 3.0, 4)])
    assert s.getvalue() == "\rstep 1/10  loss 1.5000  samples/s 3.00"


def test_plot_command_writes_pngs_that_show_the_curves(tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    _train(tmp_path, steps=6)
    run = tmp_path / "csv" / "job"
    assert plot.main([str(run), "--out", str(tmp_path / "png")]) == 0
    names = sorted(os.listdir(tmp_path / "png"))
    assert names == ["lr.png", "samples_per_sec.png", "summary.png", "train_loss.png"]
    img = mpimg.imread(tmp_path / "png" / "train_loss.png")
    assert img.shape[:2] == (400, 600)
    # a line was drawn: the plot area holds pixels of matplotlib's default line colour (C0, #1f77b4)
    rgb = img[..., :3]
    line = np.all(np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.08, axis=-1)
    assert line.sum() > 100


def test_plot_errors_say_what_to_give(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    assert "is csv_monitor enabled" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Train_Samples_train_loss.csv").write_text("a,b\n1,2\n")
    assert plot.main([str(bad)]) == 2
    assert "expected a 'step,value' header" in capsys.readouterr().err
