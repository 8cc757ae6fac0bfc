"""Which activation receives the pipeline engine posts ahead of their tick (comm/p2p.py, Note: receives
posted ahead), planned from a schedule's ticks before the batch runs.

[Note: what may be posted ahead]
Posting a receive ahead moves it earlier in time only if it also keeps its place in the sequence
of calls on its link, since NCCL matches by posting order and an ungrouped call blocks the link's
stream (comm/p2p.py, Note: one tick, two phases). Inside a tick, ``PipeComm.exchange`` posts, per
link, structure sends, then structure receives, then tensor messages; a ``BackwardPass(send_grad)``
posts its gradient during the compute, after the tick's exchange. So a ``RecvActivation`` from peer
q at tick k is posted at the end of the exchange of tick j, the last tick before k whose messages
touch q, when:

- tick k sends q no structure (that send would come first in tick k), and
- tick j's compute sends q nothing (an early gradient would come after the receive), and
- such a tick j exists (the batch's first message from q waits for its own tick).

Nothing touches the link between j and k, so the receive keeps its place, and it is the next
structure on the link, as ``post_ahead`` requires. In 1F1B's steady state every activation but the
first is posted ahead (one or more ticks: at most one per link), and moves while its receiver computes.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardspeed.pipe.schedule import (
    MESSAGES,
    BackwardPass,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    SendActivation,
    SendGrad,
)


def receives_ahead(schedule: PipeSchedule, ticks: Sequence[list[PipeInstruction]]) -> list[list[RecvActivation]]:
    """Per tick, the ``RecvActivation``s of later ticks to post once its exchange is done (Note: what
    may be posted ahead)."""
    ahead: list[list[RecvActivation]] = [[] for _ in ticks]
    last: dict[int, int | None] = {}  # peer stage -> the tick to post its next receive after (None: none)
    for k, tick in enumerate(ticks):
        sends_structure = {schedule.peer(c) for c in tick if isinstance(c, SendActivation)}
        for c in tick:
            if isinstance(c, RecvActivation):
                q = schedule.peer(c)
                j = last.get(q)
                if j is not None and q not in sends_structure:
                    ahead[j].append(c)
        for c in tick:
            if isinstance(c, MESSAGES):
                last[schedule.peer(c)] = k
        for c in tick:
            if isinstance(c, BackwardPass) and c.send_grad:  # posted mid-compute, after anything posted ahead
                last[schedule.peer(SendGrad(c.mb, c.chunk))] = None
    return ahead
