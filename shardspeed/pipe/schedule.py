"""Pipeline schedules as data: for (micro-batches m, stages p, stage s[, chunks v]) a schedule yields
**ticks**, each a list of instructions for stage s. The pipeline engine executes them; it decides
nothing about order itself, so every property of a schedule is tested here without processes.

A schedule is built in two steps: a per-rank *order* of compute operations (which forward or
backward comes next on each rank: the only thing that differs between 1F1B, GPipe and interleaved
1F1B), then one simulation that places each operation at the earliest tick where its rank is free
and its input exists. Communication is then derived from the placed operations, never written by
hand, so it cannot disagree with the compute.

[Note: the tick contract]
The engine runs every tick of every stage in this order:

1. ``LoadMicroBatch(mb)``, if present: read micro-batch ``mb`` from the data iterator (the first
   stage takes its inputs, the last stage its labels; a stage that is both takes both).
2. All of the tick's ``Send*`` and ``Recv*`` instructions, posted together as one batch of
   non-blocking p2p operations (``isend``/``irecv``), then waited on. A ``Send*`` always carries a
   tensor computed in an *earlier* tick, and a ``Recv*`` always feeds this tick's compute.
3. The compute, at most one per tick: ``ForwardPass(mb, chunk)`` or ``BackwardPass(mb, chunk)``.
   A ``BackwardPass`` with ``send_grad=True`` also sends its input gradient to the previous virtual
   stage, in the middle of the compute (Note: early gradient sends).
4. In the last tick only, after the compute: ``ReduceTiedGrads()``, ``ReduceGrads()``,
   ``OptimizerStep()`` (train schedules), on every stage at the same tick.

Pairing: ``SendActivation(mb, c)`` on rank r at tick t appears exactly when the matching
``RecvActivation(mb, c')`` is at tick t on the rank that holds the next virtual stage (and likewise
``SendGrad``/``RecvGrad`` towards the previous virtual stage), except that a gradient sent early
has no ``SendGrad``: the ``BackwardPass(send_grad=True)`` that computes it, in an earlier tick,
sends it. A rank receives at most one message per tick (its compute needs one input), so between
two ranks there is at most one message per direction per tick and the order of posting inside the
batch does not matter. Because every message of a tick has its partner in the same tick, and
nothing in the batch waits on a compute of the same tick, the batched p2p of a tick can never
deadlock. An early gradient is the exception, and it cannot deadlock either: its receive is posted
in a later tick of the previous stage, and the sender's next exchange first waits for its earlier
sends, so stage s may wait for stage s - 1 to reach that tick; stage s - 1 gets there without waiting
for stage s again (it only receives from s in its cool-down, and this gradient is what it waits for),
and stage 0 sends no gradients, so the waits end there.

Why sends lag their compute by at least one tick: if a tick's sends went out *after* its compute,
the receiver's compute in that tick would wait for the sender's, and within one tick a chain of p
stages would run one after the other. With "communicate, then compute" every stage computes in
parallel in every tick. Data is sent in the tick its consumer uses it ("just in time"): the sender
keeps its outputs for its own backward anyway, so this costs no memory, and the receiver never
holds a received tensor across ticks.

[Note: early gradient sends]
A 1F1B stage ends its batch with backwards and nothing else (its cool-down): backward ``mb`` of stage
s - 1 waits for stage s's backward ``mb`` to send the input gradient. That gradient needs only half
of stage s's backward (dY W per linear layer); the other half, the weights' gradients (dY^T X), can
follow the send. So ``TrainSchedule`` marks the backwards whose gradient the previous stage will be
idle waiting for: on stage s > 0, micro-batches ``mb >= m - (p - s)``, the p - s backwards that feed
stage s - 1's cool-down (its last forward pairs with backward ``m - (p - s)``, all its later
operations are backwards). Those run as ``BackwardPass(send_grad=True)``: input gradient, send, then
the weight gradients (activation/wgrad.py), and the ``SendGrad`` of the later tick is dropped. Each
of the p - 1 hand-overs of the cool-down gets shorter by one stage's weight-gradient time, (p - 1) W
per batch (about a third of a stage's forward + backward each); the steady state, where every stage
is busy, is unchanged, and so is what every stage holds. Marking more backwards gains nothing (the
upstream stage is busy with a forward when their gradient arrives: tested against a timing model)
and costs each one its weight products after, not beside, the input products.

Ordering: once stage s runs the first of these backwards it has received every activation from stage
s - 1 (its last forward comes before it), so from then on the two exchange gradients only, in one
direction, and an early send cannot overtake another message between them: posting order is the
same on both sides, which NCCL's in-order p2p needs. Only ``TrainSchedule`` (one chunk) sends early.

[Note: chunks and virtual stages]
With v chunks per rank (interleaved 1F1B) the model is cut into V = v * p virtual stages; chunk c of
rank s is virtual stage ``c * p + s``. So rank p - 1's chunk c feeds rank 0's chunk c + 1. The
``chunk`` field of an instruction is always the *local* chunk on the rank that executes it: for
``SendActivation(mb, c)`` the chunk that produced the tensor, for ``RecvActivation(mb, c)`` the
chunk that consumes it. ``PipeSchedule.peer(instr)`` names the other rank.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MESSAGES", "BackwardPass", "ForwardPass", "GPipeSchedule", "InferenceSchedule", "InterleavedSchedule",
    "LoadMicroBatch", "OptimizerStep", "PipeInstruction", "PipeSchedule", "RecvActivation", "RecvGrad", "ReduceGrads",
    "ReduceTiedGrads", "SendActivation", "SendGrad", "TrainSchedule",
]


# -- instructions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipeInstruction:
    """Base of every instruction a schedule yields."""


@dataclass(frozen=True)
class LoadMicroBatch(PipeInstruction):
    """Read micro-batch ``mb`` (inputs on the first stage, labels on the last)."""

    mb: int


@dataclass(frozen=True)
class _OnMicroBatch(PipeInstruction):
    mb: int
    chunk: int = 0


class ForwardPass(_OnMicroBatch):
    """Run local chunk ``chunk`` forward on micro-batch ``mb``'s input (received or loaded)."""


@dataclass(frozen=True)
class BackwardPass(_OnMicroBatch):
    """Back-propagate micro-batch ``mb`` through local chunk ``chunk`` (from the loss on the last
    virtual stage, from the received output gradient elsewhere). ``send_grad``: send the input
    gradient to the previous virtual stage as soon as it is computed, before the weight gradients
    (Note: early gradient sends)."""

    send_grad: bool = False


class SendActivation(_OnMicroBatch):
    """Send chunk ``chunk``'s output for ``mb`` to the next virtual stage."""


class RecvActivation(_OnMicroBatch):
    """Receive ``mb``'s input of chunk ``chunk`` from the previous virtual stage."""


class SendGrad(_OnMicroBatch):
    """Send the gradient of chunk ``chunk``'s input for ``mb`` to the previous virtual stage."""


class RecvGrad(_OnMicroBatch):
    """Receive the gradient of chunk ``chunk``'s output for ``mb`` from the next virtual stage."""


MESSAGES = (SendActivation, RecvActivation, SendGrad, RecvGrad)  # the instructions that are p2p messages


@dataclass(frozen=True)
class ReduceTiedGrads(PipeInstruction):
    """Sum the gradients of tied weights over the stages that hold them."""


@dataclass(frozen=True)
class ReduceGrads(PipeInstruction):
    """Reduce gradients over the data-parallel group (the strategy's usual end-of-step reduction)."""


@dataclass(frozen=True)
class OptimizerStep(PipeInstruction):
    """Clip, step the optimizer, zero gradients: the engine's step at an accumulation boundary."""


# -- the timeline ------------------------------------------------------------------------------------
# an operation in a rank's order: ("F" | "B", micro-batch, local chunk)
_Op = tuple[str, int, int]


def _place(orders: tuple[tuple[_Op, ...], ...], p: int, v: int) -> tuple[dict[int, _Op], ...]:
    """Put each rank's operations, in its order, at the earliest tick where the rank is free and the
    operation's input was produced in an earlier tick. Returns, per rank, tick -> operation."""
    last = v * p - 1
    done: dict[tuple[str, int, int], int] = {}  # (kind, mb, virtual stage) -> tick
    placed: tuple[dict[int, _Op], ...] = tuple({} for _ in range(p))
    pos = [0] * p
    remaining, tick = sum(map(len, orders)), 0
    while remaining:
        moved = False
        for r in range(p):
            if pos[r] == len(orders[r]):
                continue
            kind, mb, c = op = orders[r][pos[r]]
            vs = c * p + r
            if kind == "F":
                dep = None if vs == 0 else ("F", mb, vs - 1)
            else:
                dep = ("F", mb, last) if vs == last else ("B", mb, vs + 1)
            if dep is None or done.get(dep, tick) < tick:
                done[(kind, mb, vs)] = tick
                placed[r][tick] = op
                pos[r] += 1
                remaining -= 1
                moved = True
        # nothing placed in a tick means the next tick sees the same state: nobody will ever move
        if not moved:
            stuck = {r: orders[r][pos[r]] for r in range(p) if pos[r] < len(orders[r])}
            raise RuntimeError(f"pipeline schedule order deadlocks (p={p}, v={v}); next operations: {stuck}")
        tick += 1
    return placed


def _split_1f1b(forwards: list[_Op], backwards: list[_Op], warmup: int) -> tuple[_Op, ...]:
    """``warmup`` forwards, then one forward and one backward in turn, then the remaining backwards."""
    warmup = min(warmup, len(forwards))
    ops = forwards[:warmup]
    for k in range(len(forwards) - warmup):
        ops += [forwards[warmup + k], backwards[k]]
    return tuple(ops + backwards[len(forwards) - warmup:])


@functools.lru_cache(maxsize=256)
def _timeline(kind: str, m: int, p: int, v: int) -> tuple[dict[int, _Op], ...]:
    orders = []
    for s in range(p):
        if kind == "inference":
            orders.append(tuple(("F", i, 0) for i in range(m)))
        elif kind == "gpipe":
            orders.append(tuple([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]))
        elif v == 1:  # 1F1B: stage s runs p - s - 1 forwards ahead, so it holds at most p - s at once
            orders.append(_split_1f1b([("F", i, 0) for i in range(m)], [("B", i, 0) for i in range(m)], p - s - 1))
        else:
            # interleaved (Narayanan et al. 2021): micro-batches go in groups of p through chunk 0, then
            # the same group through chunk 1, ...; backwards visit the chunks in reverse. The warmup
            # fills the deeper virtual pipeline: 2 (p - s - 1) for this rank's place plus (v - 1) p.
            seq = [(i, c) for g in range(0, m, p) for c in range(v) for i in range(g, min(g + p, m))]
            fwd = [("F", i, c) for i, c in seq]
            bwd = [("B", i, v - 1 - c) for i, c in seq]
            orders.append(_split_1f1b(fwd, bwd, 2 * (p - s - 1) + (v - 1) * p))
    return _place(tuple(orders), p, v)


# -- schedules ---------------------------------------------------------------------------------------
class PipeSchedule:
    """Instructions for stage ``stage_id`` of ``stages`` running ``micro_batches`` micro-batches.

    Iterate (or call ``steps()``) for the ticks: one list of instructions per tick, possibly empty
    (the stage idles in the bubble). See the module's notes for the contract the engine follows.
    """

    _kind = "1f1b"
    _train = True

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 1):
        for name, value in (("micro_batches", micro_batches), ("stages", stages), ("chunks", chunks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        if not isinstance(stage_id, int) or not 0 <= stage_id < stages:
            raise ValueError(f"{type(self).__name__}: stage_id {stage_id!r} is not a stage of {stages} "
                             f"(0..{stages - 1})")
        self.micro_batches = micro_batches
        self.stages = stages
        self.stage_id = stage_id
        self.chunks = chunks

    # -- where this rank sits ------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.stages - 1

    def peer(self, instr: PipeInstruction) -> int:
        """The stage (pipeline rank) at the other end of a send or receive."""
        if not isinstance(instr, MESSAGES):
            raise TypeError(f"peer(): {instr!r} is not a send or a receive")
        vs = instr.chunk * self.stages + self.stage_id
        toward_next = isinstance(instr, SendActivation | RecvGrad)
        return (vs + (1 if toward_next else -1)) % self.stages

    # -- the ticks -----------------------------------------------------------------------------------
    def _placed(self) -> tuple[dict[int, _Op], ...]:
        return _timeline(self._kind, self.micro_batches, self.stages, self.chunks)

    def num_ticks(self) -> int:
        """Ticks in one batch, the same on every stage (see each schedule's formula)."""
        return 1 + max(t for ops in self._placed() for t in ops)

    def max_in_flight(self) -> int:
        """Most (micro-batch, chunk) activations this stage holds at once: forwarded, not yet
        back-propagated. The number of activation buffers the engine needs."""
        held = most = 0
        for _, (kind, _, _) in sorted(self._placed()[self.stage_id].items()):
            held += 1 if kind == "F" else -1
            most = max(most, held)
        return most

    num_pipe_buffers = max_in_flight  # DeepSpeed's name

    def early_grad_sends(self) -> frozenset[tuple[int, int]]:
        """(micro-batch, local chunk) of the backwards that send their input gradient themselves,
        mid-compute (Note: early gradient sends). None here; ``TrainSchedule`` marks its cool-down."""
        return frozenset()

    def steps(self) -> Iterator[list[PipeInstruction]]:
        placed, p, v = self._placed(), self.stages, self.chunks
        last_vs, me = v * p - 1, self.stage_id
        total = self.num_ticks()
        loaded: set[int] = set()
        early = self.early_grad_sends()  # my backwards that send their gradient themselves
        for tick in range(total):
            cmds: list[PipeInstruction] = []
            op = placed[me].get(tick)
            if op and op[0] == "F" and (self.is_first_stage or self.is_last_stage) and op[1] not in loaded:
                loaded.add(op[1])
                cmds.append(LoadMicroBatch(op[1]))
            # sends: what another rank consumes this tick and this rank produced (earlier)
            for r in range(p):
                other = placed[r].get(tick)
                if r == me or other is None:
                    continue
                kind, mb, c = other
                vs = c * p + r
                src = vs - 1 if kind == "F" else vs + 1  # the virtual stage that produced its input
                if 0 <= src <= last_vs and src % p == me and not (kind == "B" and (mb, src // p) in early):
                    cmds.append((SendActivation if kind == "F" else SendGrad)(mb, src // p))
            if op:
                kind, mb, c = op
                vs = c * p + me
                if kind == "F" and vs > 0:
                    cmds.append(RecvActivation(mb, c))
                if kind == "B" and vs < last_vs:
                    cmds.append(RecvGrad(mb, c))
                cmds.append(ForwardPass(mb, c) if kind == "F" else BackwardPass(mb, c, (mb, c) in early))
            if self._train and tick == total - 1:
                cmds += [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
            yield cmds

    def __iter__(self) -> Iterator[list[PipeInstruction]]:
        return self.steps()

    def __repr__(self) -> str:
        chunks = f", chunks={self.chunks}" if self.chunks > 1 else ""
        return (f"{type(self).__name__}(micro_batches={self.micro_batches}, stages={self.stages}, "
                f"stage_id={self.stage_id}{chunks})")


class TrainSchedule(PipeSchedule):
    """1F1B (PipeDream-flush): after p - s - 1 warm-up forwards, stage s alternates one forward and
    one backward, so it holds at most p - s micro-batches' activations. ``2 (m + p - 1)`` ticks.
    ``early_grads``: the cool-down's backwards send their input gradient before computing the weight
    gradients (Note: early gradient sends); off, every gradient goes in the tick that receives it."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, early_grads: bool = True):
        super().__init__(micro_batches, stages, stage_id)
        self.early_grads = early_grads

    def early_grad_sends(self) -> frozenset[tuple[int, int]]:
        """Stage s > 0: the last p - s micro-batches (Note: early gradient sends)."""
        if self.is_first_stage or not self.early_grads:
            return frozenset()
        m, p, s = self.micro_batches, self.stages, self.stage_id
        return frozenset((mb, 0) for mb in range(max(0, m - (p - s)), m))


class GPipeSchedule(PipeSchedule):
    """GPipe: every forward, then every backward (micro-batch order); holds all m micro-batches'
    activations. ``2 (m + p - 1)`` ticks, the same bubble as 1F1B."""

    _kind = "gpipe"

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches, stages, stage_id)


class InferenceSchedule(PipeSchedule):
    """Forwards only (``eval_batch``): ``m + p - 1`` ticks, no reductions, no step."""

    _kind = "inference"
    _train = False

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        super().__init__(micro_batches, stages, stage_id)

    def max_in_flight(self) -> int:
        """1: nothing is kept for a backward, and the next stage takes each output in the tick after
        it was computed (stage s runs micro-batch i at tick s + i), so one output waits at a time."""
        return 1

    num_pipe_buffers = max_in_flight


class InterleavedSchedule(PipeSchedule):
    """Interleaved 1F1B over ``chunks`` model chunks per rank (virtual stages; see the module's
    note). One tick runs one chunk, so with m a multiple of p it takes ``2 (m v + p - 1)`` ticks: the
    bubble of 1F1B in ticks v times shorter. Requires ``micro_batches % stages == 0`` when
    ``chunks > 1`` (as Megatron-LM): with a partial group of micro-batches this order deadlocks.
    ``chunks=1`` is plain 1F1B."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 2):
        super().__init__(micro_batches, stages, stage_id, chunks)
        if chunks > 1 and stages < 2:
            raise ValueError(f"InterleavedSchedule: chunks={chunks} needs at least 2 stages (one rank holding "
                             f"every chunk is plain sequential execution); use TrainSchedule")
        if chunks > 1 and micro_batches % stages:
            raise ValueError(f"InterleavedSchedule: micro_batches {micro_batches} must be a multiple of stages "
                             f"{stages} with chunks={chunks}; use {micro_batches + (-micro_batches) % stages} "
                             f"micro-batches (gradient_accumulation_steps) or TrainSchedule")
