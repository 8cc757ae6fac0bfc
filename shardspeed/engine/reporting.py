"""What the engine tells people about its steps: the ``steps_per_print`` log line (loss, lr, loss
scale, samples/s, tokens/s, TFLOP/s, MFU, wall-clock breakdown), the monitors (TensorBoard, CSV,
progress bar) after every optimizer step, and the FLOPs profile at ``flops_profiler.profile_step``.

[Note: model FLOPs under model parallelism] MFU divides the whole model's FLOPs, counted once, by
what all ranks could do. Under tensor slicing a rank holds 1/T of the sliced parameters and runs
1/T of their matmuls, so its own counts are summed over the model-parallel group, with what every
tensor-parallel rank repeats (replicated parameters, replicated work: profiling/flops_profiler.py,
Note: FLOPs under tensor slicing) taken from tensor-parallel rank 0 only. Pipe stages each add
their own layers the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from shardspeed.comm import all_reduce, get_rank, get_world_size
from shardspeed.monitor import MonitorMaster
from shardspeed.profiling import FlopsProfiler, Throughput, param_counts

log = logging.getLogger("shardspeed")


class StepReporter:
    def __init__(self, engine: Any):
        self.engine = engine
        cfg = engine.config
        self.rank = get_rank()
        self.monitor = MonitorMaster(cfg, self.rank)
        sliced, replicated = param_counts(engine.module)
        self.throughput = Throughput(get_world_size(), cfg.throughput.seq_length, cfg.throughput.peak_tflops,
                                     self._model_total(sliced, replicated), engine.policy.compute)
        self.flops_profiler: FlopsProfiler | None = None
        self.last: dict[str, float] = {}
        self._step_start: float | None = None
        self._print_sum, self._print_count = 0.0, 0
        self._step_sum, self._step_count = 0.0, 0
        self._last_print = (time.perf_counter(), 0)

    def _model_total(self, differs: float, replicated: float) -> int:
        """The whole model's count from this rank's: what differs across tensor-parallel ranks from
        every rank, what they repeat from tensor-parallel rank 0 (Note: model FLOPs under model
        parallelism). A collective over the model-parallel group when there is one."""
        topo = self.engine.topo
        mine = differs + (replicated if topo.tp_rank == 0 else 0)
        if topo.mp_world_size == 1:
            return int(mine)
        total = torch.tensor(int(mine), dtype=torch.int64, device=self.engine.device)
        all_reduce(total, group=topo.mp_group)
        return int(total.item())

    # -- forward: timing, and the FLOPs profile ---------------------------------------------------
    def before_forward(self) -> None:
        e = self.engine
        if self._step_start is None:
            self._step_start = time.perf_counter()
        fp = e.config.flops_profiler
        if (fp.enabled and self.flops_profiler is None and e.global_steps + 1 == fp.profile_step
                and e.micro_steps % e.batch.gradient_accumulation_steps == 0):
            self.flops_profiler = FlopsProfiler(e.module)
            self.flops_profiler.start_profile()

    def after_forward(self) -> None:
        prof = self.flops_profiler
        if prof is None or not prof.stats or prof.duration:
            return
        prof.stop_profile()
        e, fp = self.engine, self.engine.config.flops_profiler
        replicated = prof.get_replicated_flops()
        model_flops = self._model_total(prof.get_total_flops() - replicated, replicated)
        self.throughput.forward_flops_per_sample = model_flops / e.batch.train_micro_batch_size_per_gpu
        if self.rank == 0:
            prof.print_model_profile(profile_step=fp.profile_step, module_depth=fp.module_depth,
                                     top_modules=fp.top_modules, detailed=fp.detailed, output_file=fp.output_file)

    # -- backward and step ------------------------------------------------------------------------
    def on_backward(self, loss: torch.Tensor) -> None:
        # summed on the loss's device: an .item() here would stall the host every micro-batch;
        # the sums are read only when a step is logged or printed
        v = loss.detach().float()
        self._print_sum += v
        self._print_count += 1
        self._step_sum += v
        self._step_count += 1

    def on_step(self) -> None:
        """After an optimizer step (taken or skipped) at an accumulation boundary."""
        e = self.engine
        now = time.perf_counter()
        seconds = now - self._step_start if self._step_start is not None else None
        self._step_start = None
        step_sum, step_count = self._step_sum, self._step_count
        self._step_sum, self._step_count = 0.0, 0
        if seconds:
            self.last = self.throughput.report(e.batch.train_batch_size, seconds)
        if self.monitor.enabled:
            x = e.global_samples
            step_loss = float(step_sum) / max(step_count, 1)
            events = [("Train/Samples/train_loss", step_loss, x), ("Train/Samples/lr", e.get_lr()[0], x)]
            if e.loss_scaler is not None:
                events.append(("Train/Samples/loss_scale", e.loss_scale, x))
            events += [(f"Train/Samples/{k}", v, x) for k, v in self.last.items()]
            self.monitor.write_events(events)
        self._maybe_print(now)

    def _maybe_print(self, now: float) -> None:
        e = self.engine
        every = e.config.steps_per_print
        if not every or e.global_steps % every != 0:
            return
        then, steps_then = self._last_print
        samples_per_s = (e.global_steps - steps_then) * e.batch.train_batch_size / max(now - then, 1e-9)
        self._last_print = (now, e.global_steps)
        loss = float(self._print_sum) / max(self._print_count, 1)
        self._print_sum, self._print_count = 0.0, 0
        breakdown = e.timers.summary_ms() if e.config.wall_clock_breakdown else {}
        if self.rank != 0:
            return
        lr = ",".join(f"{x:.3e}" for x in e.get_lr())
        msg = (f"step={e.global_steps} loss={loss:.4f} lr={lr} loss_scale={e.loss_scale:g} "
               f"samples/s={samples_per_s:.2f} skipped={e.skipped_steps}")
        if "tokens_per_sec" in self.last:
            msg += f" tokens/s={self.last['tokens_per_sec']:.0f}"
        if "mfu" in self.last:
            msg += f" TFLOP/s/rank={self.last['tflops_per_rank']:.3f} MFU={100 * self.last['mfu']:.1f}%"
        if breakdown:
            msg += " | " + " ".join(f"{k}={v:.1f}ms" for k, v in sorted(breakdown.items()))
        log.info(msg)

    def close(self) -> None:
        self.monitor.close()
