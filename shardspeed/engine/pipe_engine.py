"""The pipeline engine: executes the instructions a schedule (shardspeed/pipe/schedule.py) yields
for this rank's stage, on top of the same strategy, precision, optimizer and LR machinery as the
data-parallel engine.

``initialize(model=PipelineModule(...))`` returns it. A step is ``engine.train_batch(data_iter)``:
``gradient_accumulation_steps`` micro-batches through the 1F1B schedule (or GPipe, config
``"pipeline": {"schedule": "gpipe"}``), then one optimizer step. ``pipe_stats()`` reports what the
last batch held awaiting backward (pipe_stats.py).

[Note: one batch, as executed]
Each tick runs in the order the schedule's contract fixes: load (the first stage keeps the inputs,
the last the labels; both call ``next()`` on their own iterator, DeepSpeed's convention, so the
i-th item is micro-batch i on both), one batch of p2p messages (comm/p2p.py), then the receives of
later ticks that may go now (pipe_ahead.py: they cross while this stage computes), the compute, and
in the last tick the reductions and the step. A stage keeps, per micro-batch in flight, its input
(received tensors are autograd leaves: their ``.grad`` is what goes back) and its output (what
backward starts from) until that micro-batch's backward; received buffers go back to the pool then.
The last stage's loss is scaled by the fp16 loss scale and 1/gradient_accumulation_steps, as in the
data-parallel engine, so gradients accumulate over micro-batches to what one step of the whole
batch would give. A ``BackwardPass(send_grad=True)`` (the 1F1B cool-down: schedule.py, Note: early
gradient sends) posts the input gradient between the two halves of its backward, whose forward
recorded its linear layers for that (activation/wgrad.py); the schedule then has no ``SendGrad`` for it.

[Note: reductions at the end of a batch]
The strategy sees each backward as ``begin_backward(boundary)`` / ``finish_backward()``, boundary
being this stage's last backward of the batch: stages 0 and 1 keep full local gradients and reduce
once, at the boundary; stage 2 reduce-scatters every micro-batch into its fp32 shard, as without a
pipeline. ``ReduceTiedGrads`` waits for those reductions and sums tied weights' gradients over
their stages (pipe_tied.py); ``OptimizerStep`` is the data-parallel engine's step: the norm (over
the data-parallel group, then the model-parallel group, i.e. every stage; tied copies counted once),
fp16 overflow (non-finite anywhere makes every rank skip), clipping, the optimizer, the LR schedule.
ZeRO stage 3 is refused: its parameter gathers are issued from module hooks in forward order, and
1F1B interleaves micro-batches' forwards and backwards, which that prefetch order does not model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from shardspeed.activation.wgrad import WeightGradQueue
from shardspeed.comm import all_reduce, broadcast, broadcast_object
from shardspeed.comm.p2p import (
    PipeComm,
    RecvObj,
    RecvTensors,
    SendObj,
    SendTensors,
    TensorSpec,
    encode,
    leaves,
    needs_grad,
)
from shardspeed.config import ConfigError
from shardspeed.data import RepeatingLoader
from shardspeed.engine.engine import ShardspeedEngine
from shardspeed.engine.pipe_ahead import receives_ahead
from shardspeed.engine.pipe_stats import ActivationLedger
from shardspeed.engine.pipe_tied import TiedWeights
from shardspeed.pipe.schedule import (
    MESSAGES,
    BackwardPass,
    ForwardPass,
    GPipeSchedule,
    InferenceSchedule,
    LoadMicroBatch,
    OptimizerStep,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

_USE_TRAIN_BATCH = ("the pipeline engine runs forward, backward and the optimizer step itself, over all stages "
                    "and micro-batches: call engine.train_batch(data_iter) (engine.eval_batch(data_iter) to evaluate)")


@dataclass
class _Batch:
    """What one train_batch / eval_batch holds while its ticks run (Note: one batch, as executed)."""

    micro_batches: int
    train: bool
    data: Iterator[Any] | None
    compute_loss: bool = True
    loaded: int = 0
    backwards: int = 0
    inputs: dict[int, Any] = field(default_factory=dict)
    labels: dict[int, Any] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)
    out_grads: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    split: set[int] = field(default_factory=set)  # micro-batches whose backward sends its gradient itself
    in_grads: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # live, for backward
    results: list[Any] = field(default_factory=list)  # detached losses (or outputs), in micro-batch order
    logits: list[Any] = field(default_factory=list)


class PipelineEngine(ShardspeedEngine):
    """Trains a ``PipelineModule``: ``train_batch(data_iter)``, ``eval_batch(data_iter)``.

    Built by ``shardspeed.initialize(model=PipelineModule(...))``; the remaining arguments are the
    data-parallel engine's. ``forward``, ``backward`` and ``step`` are refused (use ``train_batch``).
    """

    def __init__(self, model: torch.nn.Module, config: Any, topo: Any, mpu: Any, local_rank: int = 0,
                 **kwargs: Any):
        if config.zero_optimization.stage == 3:
            raise ConfigError("zero_optimization.stage 3 is not supported with pipeline parallelism (PipelineModule): "
                              "stage 3 gathers parameters in forward order, which 1F1B's interleaved forwards and "
                              "backwards break; use stage 0, 1 or 2 (stage 2 partitions gradients and optimizer "
                              "states over the data-parallel group)")
        # before the strategy copies parameters into masters and partitions: tied copies start equal
        tied = TiedWeights(model)
        tied.broadcast()
        super().__init__(model, config, topo, local_rank=local_rank, **kwargs)
        self.tied = tied
        self.mpu = mpu
        self.stage_id: int = model.stage_id
        self.num_stages: int = model.num_stages
        self.p2p = PipeComm(topo.pp_group, self.device)
        self.pipe_schedule: str = config.pipeline.schedule
        self._early_grads: bool = config.pipeline.early_grads
        self._wgrads = WeightGradQueue(in_place=True)  # activation/wgrad.py, Note: in place where nothing watches
        self._ledger = ActivationLedger(config.pipeline.activation_stats)
        self._ledger_bound = 0
        self._last_rank = mpu.stage_to_global(self.num_stages - 1)
        self._rank_of_stage = [mpu.stage_to_global(stage) for stage in range(self.num_stages)]  # p2p peers
        self.data_iterator: Iterator[Any] | None = None
        if self.training_dataloader is not None and (self.is_first_stage() or self.is_last_stage()):
            self.set_dataiterator(RepeatingLoader(self.training_dataloader))

    # -- DeepSpeed's accessors ------------------------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def set_dataiterator(self, iterator: Iterable[Any]) -> None:
        """The iterator ``train_batch()`` reads when called without one (first and last stages)."""
        self.data_iterator = iter(iterator)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"engine.forward() / engine(...) with a PipelineModule: {_USE_TRAIN_BATCH}")

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"engine.backward() with a PipelineModule: {_USE_TRAIN_BATCH}")

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"engine.step() with a PipelineModule: {_USE_TRAIN_BATCH}")

    # -- batches ----------------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterable[Any] | None = None) -> torch.Tensor:
        """Run one batch (``gradient_accumulation_steps`` micro-batches) through the pipeline and step.

        Args:
            data_iter: yields ``(inputs, labels)`` micro-batches; read by the first stage (inputs) and
                the last (labels). Default: the one ``set_dataiterator`` (or ``training_data``) set.

        Returns:
            the mean loss over the batch's micro-batches and data-parallel replicas, on every rank.
        """
        if self.optimizer is None:
            raise RuntimeError("train_batch() needs an optimizer: pass initialize(optimizer=...) or add an "
                               "'optimizer' section to the config")
        self._check_frozen()
        self.module.train()
        m = self.batch.gradient_accumulation_steps
        b = _Batch(m, train=True, data=self._data(data_iter, "train_batch"))
        p, s = self.num_stages, self.stage_id
        schedule = GPipeSchedule(m, p, s) if self.pipe_schedule == "gpipe" else TrainSchedule(
            m, p, s, early_grads=self._early_grads)
        b.split = {mb for mb, _ in schedule.early_grad_sends()}
        self._ledger.start_batch(self.module.parameters())
        self._ledger_bound = schedule.max_in_flight()
        self._run(schedule, b)
        loss = self._mean_over_batch(b.results)
        self.reporter.on_backward(loss)
        self.reporter.on_step()
        return loss

    def pipe_stats(self) -> dict[str, Any]:
        """What this stage held awaiting backward in the last ``train_batch`` (pipe_stats.py's note):
        ``peak_micro_batches`` (at most ``bound``: p - s with 1F1B, m with GPipe) and
        ``peak_activation_bytes`` (what autograd saved for them, parameters left out; None unless the
        config's ``"pipeline": {"activation_stats": true}`` asks for it: pipe_stats.py, Note: bytes on
        request)."""
        ledger = self._ledger
        return {"schedule": self.pipe_schedule, "stage": self.stage_id, "peak_micro_batches": ledger.peak_micro_batches,
                "bound": self._ledger_bound, "peak_activation_bytes": ledger.peak_bytes}

    @torch.no_grad()
    def eval_batch(self, data_iter: Iterable[Any], return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", num_micro_batches: int | None = None) -> Any:
        """Forward ``num_micro_batches`` (default ``gradient_accumulation_steps``) micro-batches of
        ``(inputs, labels)``, with no gradient, no step and no change to training state.

        Returns:
            with ``reduce_output='avg'``, the mean loss (the mean output when ``compute_loss`` is
            False) over micro-batches and data-parallel replicas, on every rank; with None, the list
            of per-micro-batch losses (outputs) on the last stage and None elsewhere. With
            ``return_logits``, ``(that, outputs)``, the outputs being the last stage's list.
        """
        if reduce_output not in ("avg", None):
            raise ValueError(f"eval_batch(): reduce_output must be 'avg' or None, got {reduce_output!r}")
        was_training = self.module.training
        self.module.eval()
        m = num_micro_batches or self.batch.gradient_accumulation_steps
        b = _Batch(m, train=False, data=self._data(data_iter, "eval_batch"), compute_loss=compute_loss)
        try:
            self._run(InferenceSchedule(m, self.num_stages, self.stage_id), b)
        finally:
            self.module.train(was_training)
        out = self._mean_over_batch(b.results, scalar=compute_loss) if reduce_output == "avg" else (
            b.results if self.is_last_stage() else None)
        logits = b.logits if self.is_last_stage() else None
        return (out, logits) if return_logits else out

    def _data(self, data_iter: Iterable[Any] | None, what: str) -> Iterator[Any] | None:
        if not (self.is_first_stage() or self.is_last_stage()):
            return None  # middle stages read nothing
        if data_iter is not None:
            return data_iter if isinstance(data_iter, Iterator) else iter(data_iter)
        if self.data_iterator is None:
            raise ValueError(f"{what}(): stage {self.stage_id} reads the data but has no iterator: pass "
                             f"{what}(data_iter) or call engine.set_dataiterator(...) first")
        return self.data_iterator

    def _mean_over_batch(self, results: list[Any], scalar: bool = True) -> torch.Tensor:
        """The mean of the last stage's results over micro-batches and data-parallel replicas, on every
        stage. ``scalar``: they are losses; otherwise (eval outputs) their shape travels first."""
        if self.is_last_stage():
            value = torch.stack([torch.as_tensor(r).float() for r in results]).mean(0)
            all_reduce(value, group=self.topo.dp_group)  # the last stage's replicas: the whole batch's mean
            value /= self.topo.dp_world_size
            shape = tuple(value.shape)
        else:
            value = None
            shape = ()
        if not scalar:
            shape = broadcast_object(shape, src=self._last_rank, group=self.topo.pp_group)
        if value is None:
            value = torch.zeros(shape, dtype=torch.float32, device=self.device)
        broadcast(value, src=self._last_rank, group=self.topo.pp_group)
        return value

    # -- executing ticks ----------------------------------------------------------------------------------
    def _run(self, schedule: PipeSchedule, b: _Batch) -> None:
        self._wgrads.clear()  # anything a failed batch left queued belongs to a graph nobody will finish
        ticks = list(schedule)
        try:
            for tick, ahead in zip(ticks, receives_ahead(schedule, ticks), strict=True):
                self._tick(schedule, tick, b, ahead)
        except BaseException:
            self.p2p.abandon_ahead(f"a batch failed on pipeline stage {self.stage_id}")
            raise
        self.p2p.flush()  # the last tick's sends: nothing left in flight once the batch returns
        assert not (b.inputs or b.outputs or b.out_grads or b.in_grads or b.losses), "pipeline state left over"
        assert not self.p2p.pending_ahead(), f"receives posted ahead and never used: {self.p2p.pending_ahead()}"

    def _tick(self, schedule: PipeSchedule, tick: list[Any], b: _Batch, ahead: list[RecvActivation]) -> None:
        """One tick, in the schedule's contract order: load, messages, compute, reductions; ``ahead``:
        receives of later ticks to post before the compute (pipe_ahead.py)."""
        for c in tick:
            if isinstance(c, LoadMicroBatch):
                self._load(c.mb, b)
        ops, into = [], []
        for c in tick:
            peer = self._rank_of_stage[schedule.peer(c)] if isinstance(c, MESSAGES) else None
            if isinstance(c, SendActivation):
                ops.append(SendObj(peer, b.outputs[c.mb], c.mb))
                into.append(None)
            elif isinstance(c, RecvActivation):
                ops.append(RecvObj(peer, c.mb))
                into.append((b.inputs, c.mb))
            elif isinstance(c, SendGrad):
                ops.append(SendTensors(peer, b.in_grads.pop(c.mb), c.mb))
                into.append(None)
            elif isinstance(c, RecvGrad):
                specs = [TensorSpec(tuple(t.shape), t.dtype) for t in leaves(b.outputs[c.mb]) if needs_grad(t)]
                ops.append(RecvTensors(peer, specs, c.mb))
                into.append((b.out_grads, c.mb))
        if ops:
            for got, where in zip(self.p2p.exchange(ops), into, strict=True):
                if where is not None:
                    where[0][where[1]] = got
            if not b.train:  # an inference output, once sent, is read by nobody here
                for c in tick:
                    if isinstance(c, SendActivation):
                        del b.outputs[c.mb]
                        self.p2p.release(b.inputs.pop(c.mb, None))  # it may alias the output: freed after the send
        for c in ahead:  # they move while this tick computes (comm/p2p.py, Note: receives posted ahead)
            self.p2p.post_ahead(RecvObj(self._rank_of_stage[schedule.peer(c)], c.mb))
        for c in tick:
            if isinstance(c, ForwardPass):
                self._forward(c.mb, b)
            elif isinstance(c, BackwardPass):
                send_to = self._rank_of_stage[schedule.peer(SendGrad(c.mb, c.chunk))] if c.send_grad else None
                self._backward(c.mb, b, send_to)
        for c in tick:
            if isinstance(c, ReduceTiedGrads):
                with self.timers("reduce_wait"):
                    self.strategy.wait_reductions()
                self.tied.reduce_grads(self.strategy)
            elif isinstance(c, ReduceGrads):
                self.strategy.wait_reductions()  # already done by ReduceTiedGrads; kept for schedules without it
            elif isinstance(c, OptimizerStep):
                self._pipe_step()

    def _load(self, mb: int, b: _Batch) -> None:
        # both the first and the last stage call next() once per micro-batch, in micro-batch order, so
        # the labels the last stage reads are those of the inputs the first stage read
        assert mb == b.loaded, f"micro-batch {mb} loaded out of order (expected {b.loaded})"
        assert b.data is not None
        try:
            item = next(b.data)
        except StopIteration:
            raise RuntimeError(f"the data iterator ran out at micro-batch {mb + 1} of {b.micro_batches} (stage "
                               f"{self.stage_id}): each batch reads {b.micro_batches} micro-batches "
                               "(gradient_accumulation_steps); wrap a finite loader in shardspeed.RepeatingLoader"
                               ) from None
        b.loaded += 1
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"micro-batch {mb + 1} of {b.micro_batches} is a {type(item).__name__}"
                            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}: a pipeline's "
                            "data iterator must yield (inputs, labels) pairs (the first stage reads inputs, the "
                            "last labels)")
        if self.is_first_stage():
            b.inputs[mb] = self._to_device(item[0])
        if self.is_last_stage():
            b.labels[mb] = self._to_device(item[1])

    def _forward(self, mb: int, b: _Batch) -> None:
        held = self._ledger.forward(mb) if b.train else contextlib.nullcontext()
        if b.train and mb in b.split:  # the loss too (the last stage's loss_fn may use a weight: activation/wgrad.py)
            with self._wgrads.recording():
                self._forward_and_loss(mb, b, held)
        else:
            self._forward_and_loss(mb, b, held)

    def _forward_and_loss(self, mb: int, b: _Batch, held: Any) -> None:
        with torch.set_grad_enabled(b.train), self.timers("forward"), self.strategy.forward_context(), held:
            out = self.module(b.inputs[mb])
        if not self.is_last_stage():
            self._check_output(out)
            b.outputs[mb] = out
            return
        labels = b.labels.pop(mb)
        if b.train or b.compute_loss:
            loss = self.module.loss_fn(out, labels) if self.module.loss_fn is not None else out
            if b.train:
                if not (torch.is_tensor(loss) and loss.numel() == 1):
                    raise TypeError(f"the last stage ({self.stage_id}) must produce a scalar loss for train_batch "
                                    f"(loss_fn(outputs, labels), or the outputs without a loss_fn), got "
                                    f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
                b.losses[mb] = loss
            b.results.append(loss.detach().float() if torch.is_tensor(loss) else loss)
        else:
            b.results.append(out)
        if not b.train:
            b.logits.append(out)
            self.p2p.release(b.inputs.pop(mb))

    def _check_output(self, out: Any) -> None:
        try:
            encode(out)
        except TypeError as e:
            layers = self.module.local_layer_indices()
            raise TypeError(f"pipeline stage {self.stage_id} (layers {layers.start}..{layers.stop - 1}) returned "
                            f"a {type(out).__name__} that cannot go to stage {self.stage_id + 1}: {e}") from None

    def _backward(self, mb: int, b: _Batch, send_to: int | None = None) -> None:
        """Back-propagate ``mb``. With ``send_to`` (a global rank), the backward splits: input
        gradients, sent to ``send_to`` at once, then the weight gradients (Note: early gradient sends
        in schedule.py; activation/wgrad.py)."""
        self.strategy.begin_backward(b.backwards == b.micro_batches - 1)
        b.backwards += 1
        grads: list[torch.Tensor] = []
        with self.timers("backward"):
            if self.is_last_stage():
                scale = self.loss_scale / b.micro_batches
                torch.autograd.backward(b.losses.pop(mb).float() * scale)
            else:
                outs = [t for t in leaves(b.outputs.pop(mb)) if needs_grad(t)]
                grads = b.out_grads.pop(mb)
                if outs:  # a stage whose outputs need no gradient still joins the reductions below
                    torch.autograd.backward(outs, grads)
            x = b.inputs.pop(mb)
            if not self.is_first_stage():
                # received leaves that needed grad, in leaf order: what the previous stage waits for
                in_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves(x) if t.requires_grad]
                if send_to is not None:
                    self.p2p.send_now(SendTensors(send_to, in_grads, mb))
                else:
                    b.in_grads[mb] = in_grads
            self._wgrads.compute()
            self.p2p.release(grads)  # after the weight gradients: a queued output gradient may be this buffer
            self.strategy.finish_backward()
        self._ledger.backward_done(mb)
        if not self.is_first_stage():
            self.p2p.release(x)

    def _pipe_step(self) -> None:
        with self.timers("step"):
            self._optimizer_step()
        self.global_steps += 1
        self.global_samples += self.batch.train_batch_size
        self.micro_steps += self.batch.gradient_accumulation_steps
