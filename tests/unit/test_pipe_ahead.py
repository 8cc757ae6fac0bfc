"""The receives the pipeline engine posts a tick ahead (shardspeed/engine/pipe_ahead.py): for every
schedule the engine can be given, each stage's calls on each link keep their order (what NCCL needs),
each one posted ahead is the next structure on its link, and in 1F1B every activation but a stage's
first is posted ahead; the two rules that keep the order are each needed by some tick layout."""

import collections

import pytest

from shardspeed.engine.pipe_ahead import receives_ahead
from shardspeed.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    GPipeSchedule,
    InferenceSchedule,
    InterleavedSchedule,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    TrainSchedule,
)


def link_calls(schedule, ticks, ahead=None):
    """Per peer, the calls this stage posts on the link in posting order, as ``PipeComm`` posts them
    (comm/p2p.py, Note: one tick, two phases): per tick the structure sends, the structure receives
    not posted ahead, the tensor messages, then the receives posted ahead, then the compute's early
    gradient send."""
    calls = collections.defaultdict(list)
    pending = set()
    for k, tick in enumerate(ticks):
        for c in tick:
            if isinstance(c, SendActivation):
                calls[schedule.peer(c)].append(("send structure", c.mb, c.chunk))
        for c in tick:
            if isinstance(c, RecvActivation):
                key = (schedule.peer(c), c.mb, c.chunk)
                if key in pending:
                    pending.remove(key)
                else:
                    calls[key[0]].append(("recv structure", c.mb, c.chunk))
        for c in tick:
            if isinstance(c, SendGrad | RecvGrad):
                calls[schedule.peer(c)].append((type(c).__name__, c.mb, c.chunk))
        for c in (ahead[k] if ahead else []):
            assert (schedule.peer(c), c.mb, c.chunk) not in pending
            pending.add((schedule.peer(c), c.mb, c.chunk))
            calls[schedule.peer(c)].append(("recv structure", c.mb, c.chunk))
        for c in tick:
            if isinstance(c, BackwardPass) and c.send_grad:
                calls[schedule.peer(SendGrad(c.mb, c.chunk))].append(("SendGrad", c.mb, c.chunk))
    assert not pending, "a receive posted ahead that no tick asked for"
    return dict(calls)


def schedules():
    for p in range(2, 7):
        for m in (1, 2, 3, 4, 5, 8, 13):
            for s in range(p):
                yield TrainSchedule(m, p, s)
                yield TrainSchedule(m, p, s, early_grads=False)
                yield GPipeSchedule(m, p, s)
                yield InferenceSchedule(m, p, s)
        for m in (p, 2 * p, 4 * p):
            for v in (2, 3):
                for s in range(p):
                    yield InterleavedSchedule(m, p, s, chunks=v)


def test_posting_ahead_keeps_every_links_order_and_posts_only_the_next_structure():
    for schedule in schedules():
        ticks = list(schedule)
        ahead = receives_ahead(schedule, ticks)
        assert link_calls(schedule, ticks, ahead) == link_calls(schedule, ticks), schedule
        for j, posts in enumerate(ahead):
            for c in posts:  # the later tick that uses it, and nothing on the link in between
                k = next(k for k in range(j + 1, len(ticks)) if c in ticks[k])
                between = [x for t in ticks[j + 1:k] for x in t
                           if isinstance(x, SendActivation | RecvActivation | SendGrad | RecvGrad)
                           and schedule.peer(x) == schedule.peer(c)]
                assert between == [], (schedule, c, between)


@pytest.mark.parametrize("make", [TrainSchedule, GPipeSchedule, InferenceSchedule])
def test_every_activation_but_a_stages_first_is_posted_ahead(make):
    for p, m in ((2, 4), (2, 16), (4, 4), (4, 16), (8, 32)):
        for s in range(p):
            schedule = make(m, p, s)
            posted = [c for posts in receives_ahead(schedule, list(schedule)) for c in posts]
            assert posted == [RecvActivation(mb) for mb in range(1, m)] if s > 0 else posted == [], (p, m, s)


class _Link:
    """A stand-in schedule for hand-written ticks: every message goes to stage 1."""

    @staticmethod
    def peer(instr):
        return 1


def test_a_receive_is_not_posted_ahead_of_a_structure_sent_the_same_tick_or_an_early_gradient():
    # a structure sent to the same peer in the receive's own tick is posted before it there
    ticks = [[RecvActivation(0), ForwardPass(0)], [SendActivation(0), RecvActivation(1), ForwardPass(1)]]
    assert receives_ahead(_Link(), ticks) == [[], []]
    # an early gradient goes out during the compute, after what the tick's exchange posted
    ticks = [[RecvActivation(0), ForwardPass(0)], [BackwardPass(0, send_grad=True)], [RecvActivation(1)]]
    assert receives_ahead(_Link(), ticks) == [[], [], []]
    # without either, the receive goes at the end of the last exchange on the link
    ticks = [[RecvActivation(0), ForwardPass(0)], [BackwardPass(0)], [RecvActivation(1), ForwardPass(1)]]
    assert receives_ahead(_Link(), ticks) == [[RecvActivation(1)], [], []]
    for ticks in ([[RecvActivation(0)], [SendActivation(0), RecvActivation(1)]],
                  [[RecvActivation(0)], [BackwardPass(0, send_grad=True)], [RecvActivation(1)]]):
        forced = [[RecvActivation(1)]] + [[] for _ in ticks[1:]]  # posting it after tick 0 anyway reorders the link
        assert link_calls(_Link(), ticks, forced) != link_calls(_Link(), ticks)
