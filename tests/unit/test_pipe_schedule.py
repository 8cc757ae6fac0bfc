"""Pipeline schedules, checked exhaustively for every p <= 8 stages and m <= 32 micro-batches (interleaved:
v in {1, 2, 3}, m a multiple of p when v > 1) against the tick contract of shardspeed/pipe/schedule.py."""

import collections

import pytest

from shardspeed.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    GPipeSchedule,
    InferenceSchedule,
    InterleavedSchedule,
    LoadMicroBatch,
    OptimizerStep,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

COMM = (SendActivation, RecvActivation, SendGrad, RecvGrad)
COMPUTE = (ForwardPass, BackwardPass)
FINAL = (ReduceTiedGrads, ReduceGrads, OptimizerStep)


def phase(instr):
    """The position of an instruction's kind inside a tick, by the contract."""
    for rank, kinds in enumerate(((LoadMicroBatch,), COMM, COMPUTE, FINAL)):
        if isinstance(instr, kinds):
            return rank
    raise AssertionError(f"unknown instruction {instr!r}")


def check(make, m, p, v=1, train=True):
    """Every property of the contract for one (m, p, v); returns (ticks, in-flight maximum per stage)."""
    scheds = [make(s) for s in range(p)]
    ticks = [list(s) for s in scheds]
    total = len(ticks[0])
    assert all(len(t) == total for t in ticks), "every stage has the same number of ticks"
    assert all(s.num_ticks() == total for s in scheds)
    last_vs = v * p - 1
    when = {}  # ("F" | "B", mb, virtual stage) -> tick
    messages = collections.Counter()  # (tick, src rank, dst rank, kind, mb) seen from each side
    early = {}  # (src rank, dst rank, mb) -> tick of the BackwardPass that sends the gradient itself
    posted = collections.defaultdict(list)  # (src, dst) -> [(when, what, mb)] in posting order, per side
    in_flight = []
    for s, (sched, stage_ticks) in enumerate(zip(scheds, ticks)):
        held = most = 0
        loads = []
        for t, cmds in enumerate(stage_ticks):
            assert [phase(c) for c in cmds] == sorted(phase(c) for c in cmds), f"tick order on stage {s}: {cmds}"
            computes = [c for c in cmds if isinstance(c, COMPUTE)]
            assert len(computes) <= 1, f"one compute per tick: {cmds}"
            finals = [c for c in cmds if isinstance(c, FINAL)]
            if train and t == total - 1:
                assert finals == [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]
            else:
                assert finals == []
            loads += [(t, c.mb) for c in cmds if isinstance(c, LoadMicroBatch)]
            recvs = [c for c in cmds if isinstance(c, RecvActivation | RecvGrad)]
            assert len(recvs) <= 1, "a stage receives at most one message per tick"
            for c in computes:
                key = ("F" if isinstance(c, ForwardPass) else "B", c.mb, c.chunk * p + s)
                assert key not in when, f"{key} computed twice"
                when[key] = t
                held += 1 if key[0] == "F" else -1
                most = max(most, held)
                vs = key[2]
                # the input arrives in this very tick (just in time), or is local
                needs = (key[0] == "F" and vs > 0) or (key[0] == "B" and vs < last_vs)
                kind = RecvActivation if key[0] == "F" else RecvGrad
                assert (kind(c.mb, c.chunk) in recvs) == needs and len(recvs) == needs, (s, t, cmds)
                if isinstance(c, BackwardPass) and c.send_grad:  # Note: early gradient sends
                    assert vs > 0, f"stage {s} has nobody to send a gradient to: {c}"
                    peer = sched.peer(SendGrad(c.mb, c.chunk))
                    early[(s, peer, c.mb)] = t
                    posted[("send", s, peer)].append(((t, 1), "grad", c.mb))
            for c in cmds:
                if isinstance(c, COMM):
                    peer = sched.peer(c)
                    assert peer != s
                    sending = isinstance(c, SendActivation | SendGrad)
                    src, dst = (s, peer) if sending else (peer, s)
                    what = "act" if isinstance(c, SendActivation | RecvActivation) else "grad"
                    messages[(t, src, dst, what, c.mb, "send" if sending else "recv")] += 1
                    posted[("send" if sending else "recv", src, dst)].append(((t, 0), what, c.mb))
                if isinstance(c, SendActivation):  # produced by this rank's own earlier forward
                    assert when.get(("F", c.mb, c.chunk * p + s), t) < t
                if isinstance(c, SendGrad):
                    assert when.get(("B", c.mb, c.chunk * p + s), t) < t
        assert held == (0 if train else m)
        if train:
            assert sched.max_in_flight() == most
        in_flight.append(most)
        if s in (0, p - 1):  # inputs on the first stage, labels on the last, once, with the first forward
            firsts = sorted((min(t for (k, mb, vs), t in when.items() if k == "F" and mb == i and vs % p == s), i)
                            for i in range(m))
            assert loads == firsts
        else:
            assert loads == []
    # pairing: every send meets its receive on the peer at the same tick, and nothing else
    sends = collections.Counter({k[:-1]: n for k, n in messages.items() if k[-1] == "send"})
    recvs = collections.Counter({k[:-1]: n for k, n in messages.items() if k[-1] == "recv"})
    for (src, dst, mb), t in early.items():  # a gradient sent early is received in a later tick
        (got,) = [k for k in recvs if k[1:] == (src, dst, "grad", mb)]
        assert got[0] > t, (src, dst, mb, t, got)
        del recvs[got]
    assert sends == recvs and max(sends.values(), default=1) == 1
    # both ends of every link post its messages in one order (NCCL matches p2p in posting order)
    for (side, src, dst), seq in posted.items():
        if side == "send":
            other = [(w, mb) for _, w, mb in sorted(posted[("recv", src, dst)])]
            assert [(w, mb) for _, w, mb in sorted(seq)] == other, (src, dst, sorted(seq))
    # every operation once, after what it depends on
    kinds = ("F", "B") if train else ("F",)
    assert set(when) == {(k, i, vs) for k in kinds for i in range(m) for vs in range(v * p)}
    for (k, i, vs), t in when.items():
        if k == "F" and vs > 0:
            assert when[("F", i, vs - 1)] < t
        if k == "B":
            assert when[("F", i, vs)] < t
            assert when[("B", i, vs + 1) if vs < last_vs else ("F", i, vs)] < t
    return total, in_flight


CASES = [(p, m) for p in range(1, 9) for m in range(1, 33)]


def test_1f1b_every_stage_count_and_memory():
    for p, m in CASES:
        total, held = check(lambda s, m=m, p=p: TrainSchedule(m, p, s), m, p)
        assert total == 2 * (m + p - 1), (p, m)
        assert held == [min(p - s, m) for s in range(p)], (p, m, held)


def test_gpipe_every_stage_count_and_memory():
    for p, m in CASES:
        total, held = check(lambda s, m=m, p=p: GPipeSchedule(m, p, s), m, p)
        assert total == 2 * (m + p - 1), (p, m)
        assert held == [m] * p


def test_inference_forward_only():
    for p, m in CASES:
        total, held = check(lambda s, m=m, p=p: InferenceSchedule(m, p, s), m, p, train=False)
        assert total == m + p - 1
        for s in range(p):  # each output is sent in the tick right after it was computed
            ticks = list(InferenceSchedule(m, p, s))
            for t, cmds in enumerate(ticks):
                for c in cmds:
                    if isinstance(c, SendActivation):
                        assert ForwardPass(c.mb) in ticks[t - 1]
            assert InferenceSchedule(m, p, s).max_in_flight() == 1
        assert all(not isinstance(c, BackwardPass) for s in range(p) for t in InferenceSchedule(m, p, s) for c in t)


@pytest.mark.parametrize("v", [1, 2, 3])
def test_interleaved_every_stage_count_and_memory(v):
    for p, m in CASES:
        if v > 1 and (p == 1 or m % p):
            continue
        total, held = check(lambda s, m=m, p=p: InterleavedSchedule(m, p, s, chunks=v), m, p, v)
        assert total == 2 * (m * v + p - 1), (p, m, v)
        warmup = [(p - s - 1) if v == 1 else 2 * (p - s - 1) + (v - 1) * p for s in range(p)]
        assert held == [min(w + 1, m * v) for w in warmup], (p, m, v)


def test_interleaved_shortens_the_bubble():
    # a chunk's forward or backward is 1/v of a stage's: in stage-op time the bubble 2 (p - 1) shrinks v times
    p, m, v = 4, 8, 2
    assert TrainSchedule(m, p, 0).num_ticks() - 2 * m == 2 * (p - 1)
    assert InterleavedSchedule(m, p, 0, chunks=v).num_ticks() / v - 2 * m == 2 * (p - 1) / v


def test_small_example_reads_as_documented():
    # p = 2, m = 2: stage 0 runs F0 F1 B0 B1, stage 1 runs F0 B0 F1 B1; data moves in its consumer's tick,
    # except the gradient stage 1's last backward sends as soon as it has it
    assert list(TrainSchedule(micro_batches=2, stages=2, stage_id=0)) == [
        [LoadMicroBatch(0), ForwardPass(0)],
        [LoadMicroBatch(1), SendActivation(0), ForwardPass(1)],
        [],
        [SendActivation(1), RecvGrad(0), BackwardPass(0)],
        [],
        [RecvGrad(1), BackwardPass(1), ReduceTiedGrads(), ReduceGrads(), OptimizerStep()],
    ]
    assert list(TrainSchedule(micro_batches=2, stages=2, stage_id=1)) == [
        [],
        [LoadMicroBatch(0), RecvActivation(0), ForwardPass(0)],
        [BackwardPass(0)],
        [LoadMicroBatch(1), SendGrad(0), RecvActivation(1), ForwardPass(1)],
        [BackwardPass(1, send_grad=True)],  # stage 0's cool-down waits for it: sent mid-backward
        [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()],
    ]
    assert list(TrainSchedule(2, 2, 1, early_grads=False))[-2:] == [
        [BackwardPass(1)], [SendGrad(1), ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]]
    assert InterleavedSchedule(4, 2, 1, chunks=2).peer(SendActivation(0, chunk=0)) == 0  # chunk 0 -> rank 0 chunk 1


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="micro_batches 5 must be a multiple of stages 2"):
        InterleavedSchedule(5, 2, 0, chunks=2)
    with pytest.raises(ValueError, match="needs at least 2 stages"):
        InterleavedSchedule(4, 1, 0, chunks=2)
    with pytest.raises(ValueError, match="stage_id 3 is not a stage of 3"):
        TrainSchedule(4, 3, 3)
    with pytest.raises(ValueError, match="micro_batches must be a positive integer"):
        GPipeSchedule(0, 2, 0)
    with pytest.raises(TypeError, match="not a send or a receive"):
        TrainSchedule(2, 2, 0).peer(ForwardPass(0))


def test_1f1b_sends_early_the_gradients_the_cool_down_waits_for():
    for p, m in CASES:
        for s in range(p):
            marked = TrainSchedule(m, p, s).early_grad_sends()
            assert marked == ({(mb, 0) for mb in range(max(0, m - (p - s)), m)} if s else set()), (p, m, s)
            assert TrainSchedule(m, p, s, early_grads=False).early_grad_sends() == frozenset()
            assert GPipeSchedule(m, p, s).early_grad_sends() == frozenset()
        total, held = check(lambda s, m=m, p=p: TrainSchedule(m, p, s, early_grads=False), m, p)
        assert total == 2 * (m + p - 1) and held == [min(p - s, m) for s in range(p)]


class _AllEarly(TrainSchedule):
    """Every backward with somebody to send to splits (for the timing model: it gains nothing more)."""

    def early_grad_sends(self):
        return frozenset() if self.is_first_stage else frozenset((mb, 0) for mb in range(self.micro_batches))


def batch_time(scheds, f, bi, w):
    """A timing model of the engine running these ticks: each stage in tick order; a tick posts its
    sends when it starts, waits for its receives' sends, then computes (forward f, backward bi + w, the
    gradient sent after bi when ``send_grad``). Returns when the last stage finishes."""
    p = len(scheds)
    ticks = [list(s) for s in scheds]
    clock, pos, started = [0.0] * p, [0] * p, [False] * p
    sent = {}  # (what, mb, src, dst) -> time posted
    while any(pos[s] < len(ticks[s]) for s in range(p)):
        moved = False
        for s, sched in enumerate(scheds):
            if pos[s] == len(ticks[s]):
                continue
            cmds = ticks[s][pos[s]]
            if not started[s]:
                for c in cmds:
                    if isinstance(c, SendActivation | SendGrad):
                        sent[(type(c).__name__[4:], c.mb, s, sched.peer(c))] = clock[s]
                started[s] = True
            waits = [("Activation" if isinstance(c, RecvActivation) else "Grad", c.mb, sched.peer(c), s)
                     for c in cmds if isinstance(c, RecvActivation | RecvGrad)]
            if any(k not in sent for k in waits):
                continue
            clock[s] = max([clock[s]] + [sent[k] for k in waits])
            for c in cmds:
                if isinstance(c, ForwardPass):
                    clock[s] += f
                elif isinstance(c, BackwardPass):
                    clock[s] += bi
                    if c.send_grad:
                        sent[("Grad", c.mb, s, sched.peer(SendGrad(c.mb)))] = clock[s]
                    clock[s] += w
            pos[s], started[s], moved = pos[s] + 1, False, True
        assert moved, "the timing model deadlocked"
    return max(clock)


@pytest.mark.parametrize("f,bi,w", [(1.0, 1.0, 1.0), (1.0, 1.3, 0.7)])
def test_early_gradients_shorten_each_cool_down_hand_over_by_one_weight_gradient(f, bi, w):
    # the 1F1B batch with every backward whole is m (f + bi + w) + (p - 1)(f + bi + w) on this model; the early
    # sends take (p - 1) w off it, and splitting every other backward too takes nothing more off
    for p in (2, 3, 4, 8):
        for m in (1, 2, 4, 8, 16, 32):
            whole = batch_time([TrainSchedule(m, p, s, early_grads=False) for s in range(p)], f, bi, w)
            early = batch_time([TrainSchedule(m, p, s) for s in range(p)], f, bi, w)
            assert whole == pytest.approx((m + p - 1) * (f + bi + w)), (p, m)
            assert whole - early == pytest.approx((p - 1) * w), (p, m)
            assert batch_time([_AllEarly(m, p, s) for s in range(p)], f, bi, w) == pytest.approx(early), (p, m)
