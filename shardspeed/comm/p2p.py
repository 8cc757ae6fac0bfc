"""Point-to-point messages between pipeline neighbours: structures of tensors, with their layout.

A pipeline stage may hand the next one a tensor, or tuples, lists and dicts of tensors (nested),
integer and bool tensors (ids, masks) beside float ones, several tensors that need gradients, and
shapes that change from one micro-batch to the next. The receiver knows none of this in advance,
so every structure travels with a small header that describes it.

[Note: the header]
``encode`` flattens a structure depth-first into int64 codes plus its tensors (the leaves):
``tensor: [TENSOR, dtype, needs_grad, ndim, *shape]``, ``tuple/list: [kind, n, *children]``,
``dict: [DICT, n, (len(key), *utf8 bytes of key, child) * n]``, ``None: [NONE]``. On the wire a
header is a fixed slot of ``HEADER_SLOT`` int64 (512 bytes): ``[length, check, *codes]`` (check:
Note: predicted layouts); codes beyond the slot follow in a second message whose length the slot
announced (in phase B: Note: one tick, two phases), so the usual case costs one small message and
no structure is too big. A header is sent with every structure (it is a few hundred bytes against
activations of kilobytes to megabytes), which is what lets shapes change per micro-batch; nothing
has to be warmed up.

[Note: predicted layouts]
Sending the payload only once the receiver has read the header costs a round trip per structure: a
gloo send of a large tensor moves once the peer has posted its receive, which it can only do after
the header. Consecutive micro-batches almost always have one layout, so both ends of a link keep
the last layout on it and how many structures in a row had it (``_Link``; the sender for what it
sent to a peer, the receiver for what it received from it: they change at the same messages). Once
a layout came twice in a row, the receiver posts, with the header receive, receives for it
(``_KIND_PREDICTED``), and the sender, who knows that prediction, sends its tensors there at once
when the layout is the same again. When it is not, the sender fills the predicted receives with
fillers of the predicted shapes and sends the real tensors in phase B, into buffers the header
sized, as without a prediction; the receiver gives the filled buffers back to the pool. So shapes
still change freely per micro-batch: a layout that changes every time is never predicted and costs
what it did before, and a change after a run of equal ones costs the fillers' bytes once. The
header is always sent: it tells the receiver whether its prediction held, and its ``check`` (a
fingerprint of the layout the sender believes was predicted, 0 for none) must equal the receiver's,
so ends that fell out of step (an exchange that failed part-way) raise instead of reading fillers
as data. The receiver waits for the predicted payload before its header: the sender posts both in
its phase A, header first, so one wake-up finds both.

[Note: receives posted ahead]
A gloo send moves once its receive is posted; posted at the start of the receiver's tick, the
activation crosses while the receiver waits, after its previous compute. ``post_ahead(RecvObj)``
posts a structure's header receive and its predicted payload receives right away, for the exchange
that will ask for it, so the bytes cross while this rank computes (measured at P = 2: a stage waited
2-8 ms per micro-batch on this, ~45 ms of a 1.25 s step). The exchange that lists the receive uses
what was posted (one pending receive per peer, for the tag it was posted with, else it raises). It
must be the next structure on that link, so the layout the receiver predicts is the one the sender
predicts when it sends (Note: predicted layouts), and the caller must keep NCCL's per-link order
(Note: one tick, two phases): nothing may be posted on the link between this post and the exchange's
place for it (engine/pipe_ahead.py plans that from the schedule). Its predicted buffers come from the
pool while this tick's sends are in flight, so buffers an in-flight send reads are skipped (a stage
may forward a received tensor, and an inference stage gives its inputs back right after sending).
A receive may wait several ticks (it goes after the link's last exchange before its own), so a
receiving stage holds one more activation-sized buffer than the schedule's in-flight count. A batch
that fails with receives posted ahead makes the link unusable (``abandon_ahead``: they cannot be
taken back and would catch later messages); the receive's reported time starts at the exchange.

[Note: gradients]
A leaf "needs grad" when it is floating point and requires grad on the sender. The receiver gets
exactly those leaves as leaves requiring grad, and after its backward sends back one gradient per
such leaf, in leaf order (zeros when autograd produced none, so the message always matches). The
sender knows the shapes and dtypes of what it sent, so gradients travel without a header.

[Note: one tick, two phases]
All messages of one pipeline tick are exchanged together (``PipeComm.exchange``). Phase A posts
every header send and receive, each followed by its predicted payload (Note: predicted layouts; a
receive posted ahead was posted in this place's stead, Note: receives posted ahead),
and every headerless tensor message (gradients); it waits only for the header receives, which
peers' phase A posts match. Phase B posts the header overflows, then the payloads that were not
predicted, whose receive buffers are now known, and everything is waited on. No wait in phase A
depends on a peer's phase B, so two ranks sending to each other in the same tick (interleaved
schedules with two stages) cannot deadlock. Messages carry tags (``tag << 3 | kind``), so gloo
matches them by tag; within a tag, gloo keeps the posting order (measured).

NCCL ignores tags and matches by posting order, and a call posted alone blocks its stream (one per
pair of ranks) until the other end's matching call runs. So both ends post in one order: headers
(each with its predicted payload), tensor messages, overflows, payloads, each in the order the tick
lists them. In the ticks of 1F1B and GPipe, where structures cross a link in one direction and
gradients in the other, the two ends' calls on a link then form one sequence with every send facing
its receive, and ungrouped calls cannot wait on each other; the overflow goes in phase B for this,
since the receiver can post its receive only after reading the header, behind its own tensor
messages. Two ranks sending each other structures in one tick (interleaved with two stages, which
the engine does not run) cross: each direction still matches, but NCCL would have to run the tick's
calls grouped. tests/distributed/test_p2p_order.py records both ends of every link and checks this.

[Note: receive buffers]
Received tensors live in buffers from a pool keyed by (dtype, shape). The pipeline engine owns
their lifetime: it gives a structure back (``release``) once nothing can read it any more (after
its backward, or after an inference stage forwarded it), and the next receive of the same dtype
and shape reuses the storage instead of allocating.

[Note: sends finish in the next tick]
``exchange`` returns once its receives are done; its sends stay in flight, holding the tensors they
read, so this rank's compute in the tick overlaps them (a receiver needs its data before computing,
a sender does not). The next ``exchange`` waits for them first, before it takes any receive buffer
from the pool (a buffer released while a send still read it is not reused early), and the engine
calls ``flush()`` before a batch returns, so nothing is left in flight outside it.

p2p messages are reported to the collectives' observers (comm log, profiler) as ``send`` and
``recv`` with their bytes, headers included.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from shardspeed.comm import health
from shardspeed.comm.backend import ProcessGroup
from shardspeed.comm.collectives import Handle, report

HEADER_SLOT = 64
_TENSOR, _TUPLE, _LIST, _DICT, _NONE = range(5)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_KIND_HEADER, _KIND_OVERFLOW, _KIND_PAYLOAD, _KIND_TENSORS, _KIND_PREDICTED = range(5)
_KIND_BITS = 3


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    needs_grad: bool = False


def needs_grad(t: torch.Tensor) -> bool:
    """Whether ``t`` gets a gradient back from the stage it is sent to (Note: gradients)."""
    return t.requires_grad and t.is_floating_point()


# -- the layout of a structure (pure) ---------------------------------------------------------------
def encode(obj: Any, path: str = "output") -> tuple[list[int], list[torch.Tensor]]:
    """The header codes of ``obj`` and its tensors, depth-first (Note: the header). ``path`` names
    ``obj`` in the error raised for anything that is not a tensor, tuple, list, dict or None."""
    codes: list[int] = []
    leaves: list[torch.Tensor] = []
    _encode(obj, path, codes, leaves)
    return codes, leaves


def _encode(obj: Any, path: str, codes: list[int], leaves: list[torch.Tensor]) -> None:
    if torch.is_tensor(obj):
        if obj.dtype not in _DTYPE_CODE:
            raise TypeError(f"{path} is a tensor of dtype {obj.dtype}, which cannot be sent between stages")
        codes += [_TENSOR, _DTYPE_CODE[obj.dtype], int(needs_grad(obj)), obj.dim(), *obj.shape]
        leaves.append(obj)
    elif isinstance(obj, (tuple, list)):
        codes += [_TUPLE if isinstance(obj, tuple) else _LIST, len(obj)]
        for i, x in enumerate(obj):
            _encode(x, f"{path}[{i}]", codes, leaves)
    elif isinstance(obj, dict):
        codes += [_DICT, len(obj)]
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path} is a dict with key {k!r} of type {type(k).__name__}; "
                                "only str keys can be sent between stages")
            raw = k.encode()
            codes += [len(raw), *raw]
            _encode(v, f"{path}[{k!r}]", codes, leaves)
    elif obj is None:
        codes.append(_NONE)
    else:
        raise TypeError(f"{path} is a {type(obj).__name__}; between pipeline stages only tensors and "
                        "tuples, lists and dicts of tensors (or None) can be sent")


@dataclass
class Layout:
    """A decoded header: the tensors' specs in leaf order and the tree to put them back into."""

    codes: list[int]
    specs: list[TensorSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        end = self._walk(0, self.specs)
        if end != len(self.codes):
            raise ValueError(f"malformed p2p header: {len(self.codes) - end} codes left after the structure")

    def _walk(self, i: int, specs: list[TensorSpec]) -> int:
        kind = self.codes[i]
        if kind == _TENSOR:
            dtype, grad, ndim = self.codes[i + 1:i + 4]
            specs.append(TensorSpec(tuple(self.codes[i + 4:i + 4 + ndim]), _DTYPES[dtype], bool(grad)))
            return i + 4 + ndim
        if kind in (_TUPLE, _LIST):
            i, n = i + 2, self.codes[i + 1]
            for _ in range(n):
                i = self._walk(i, specs)
            return i
        if kind == _DICT:
            i, n = i + 2, self.codes[i + 1]
            for _ in range(n):
                i = self._walk(i + 1 + self.codes[i], specs)
            return i
        if kind == _NONE:
            return i + 1
        raise ValueError(f"malformed p2p header: unknown code {kind} at {i}")

    def build(self, tensors: Sequence[torch.Tensor]) -> Any:
        """The structure with ``tensors`` (in leaf order) at its leaves."""
        it = iter(tensors)
        obj, _ = self._build(0, it)
        return obj

    def received(self, bufs: Sequence[torch.Tensor]) -> Any:
        """The structure over receive buffers: leaves that needed grad on the sender require it here."""
        return self.build([b.detach().requires_grad_(s.needs_grad) for b, s in zip(bufs, self.specs, strict=True)])

    def _build(self, i: int, it: Any) -> tuple[Any, int]:
        kind = self.codes[i]
        if kind == _TENSOR:
            return next(it), i + 4 + self.codes[i + 3]
        if kind in (_TUPLE, _LIST):
            items, i = [], i + 2
            for _ in range(self.codes[i - 1]):
                x, i = self._build(i, it)
                items.append(x)
            return (tuple(items) if kind == _TUPLE else items), i
        if kind == _DICT:
            out, n, i = {}, self.codes[i + 1], i + 2
            for _ in range(n):
                klen = self.codes[i]
                key = bytes(self.codes[i + 1:i + 1 + klen]).decode()
                out[key], i = self._build(i + 1 + klen, it)
            return out, i
        return None, i + 1


def leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of a structure, depth-first (the order ``encode`` sends them in)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for x in obj for t in leaves(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in leaves(x)]
    return []


# -- the wire ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SendObj:
    """Send a structure to global rank ``peer``."""
    peer: int
    obj: Any
    tag: int = 0


@dataclass(frozen=True)
class RecvObj:
    """Receive a structure from global rank ``peer``; tensors that needed grad arrive requiring grad."""
    peer: int
    tag: int = 0


@dataclass(frozen=True)
class SendTensors:
    """Send a list of tensors whose specs the receiver knows (gradients)."""
    peer: int
    tensors: Sequence[torch.Tensor]
    tag: int = 0


@dataclass(frozen=True)
class RecvTensors:
    peer: int
    specs: Sequence[TensorSpec]
    tag: int = 0


Op = SendObj | RecvObj | SendTensors | RecvTensors


class _PostedRecv(NamedTuple):
    """A structure's receives once posted: the header slot and its work, and, when the layout was
    predicted, (layout, payload buffers, their works)."""
    tag: int
    slot: torch.Tensor
    header: Any
    guessed: tuple[Layout, list[torch.Tensor], list[Any]] | None


class _Link:
    """The layouts seen on one link in one direction (Note: predicted layouts): the last one, and how
    many structures in a row had it. Sender and receiver each keep one and update it at the same
    messages."""

    def __init__(self, codes: list[int]):
        self.layout, self.repeats = Layout(codes), 1

    def guess(self) -> Layout | None:
        """The layout the receiver posts ahead: the last one, once it came twice in a row."""
        return self.layout if self.repeats >= 2 else None

    @staticmethod
    def record(links: dict[int, _Link], peer: int, codes: list[int]) -> _Link:
        """Count one more structure of layout ``codes`` on the link to or from ``peer``."""
        link = links.get(peer)
        if link is None:
            link = links[peer] = _Link(codes)
        elif codes == link.layout.codes:
            link.repeats += 1
        else:
            link.layout, link.repeats = Layout(codes), 1
        return link


def _checksum(layout: Layout | None) -> int:
    """A layout's fingerprint in the header (0: no prediction), so both ends check they predicted alike."""
    if layout is None:
        return 0
    h = 1469598103934665603
    for c in layout.codes:
        h = ((h ^ (c & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h or 1


class BufferPool:
    """Receive buffers by (dtype, shape), reused once given back (Note: receive buffers)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._free: dict[tuple[torch.dtype, tuple[int, ...]], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer
        self.allocated = 0  # buffers made (not reused), for tests and memory counts

    def take(self, spec: TensorSpec, busy: frozenset[int] = frozenset()) -> torch.Tensor:
        """A buffer for ``spec``; none whose storage is in ``busy`` (read by a send in flight)."""
        free = self._free.get((spec.dtype, spec.shape), [])
        k = len(free) - 1
        while k >= 0 and free[k].data_ptr() in busy:
            k -= 1
        if k >= 0:
            buf = free.pop(k)
        else:
            buf = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            self.allocated += 1
        if buf.numel():  # every empty tensor may share a data_ptr: they are not worth reusing
            self._lent[buf.data_ptr()] = buf
        return buf

    def give(self, t: torch.Tensor) -> None:
        buf = self._lent.pop(t.data_ptr(), None) if t.numel() else None
        if buf is not None:
            self._free.setdefault((buf.dtype, tuple(buf.shape)), []).append(buf)

    def held_bytes(self) -> int:
        bufs = list(self._lent.values()) + [b for bs in self._free.values() for b in bs]
        return sum(b.numel() * b.element_size() for b in bufs)


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class PipeComm:
    """Exchanges the point-to-point messages of pipeline ticks over ``group`` (peers are global
    ranks), with receive buffers from one pool on ``device``."""

    def __init__(self, group: ProcessGroup | None, device: torch.device):
        self.group = group
        self.device = device
        self.pool = BufferPool(device)
        # sends of the last exchange still in flight, with the tensors they read (Note: sends finish
        # in the next tick)
        self._sending: list[tuple[Handle, list[Any]]] = []
        # the layout of the last structure sent to / received from each peer (Note: predicted layouts)
        self._sent_layout: dict[int, _Link] = {}
        self._recv_layout: dict[int, _Link] = {}
        self.predicted = 0  # structures received into predicted buffers (for tests and stats)
        self._ahead: dict[int, _PostedRecv] = {}  # peer -> a receive posted ahead (Note: receives posted ahead)
        self._abandoned: str | None = None  # why receives posted ahead were left behind (then nothing more runs)

    def flush(self) -> None:
        """Wait for the sends still in flight (the engine calls it before a batch returns)."""
        sending, self._sending = self._sending, []
        for handle, _keep in sending:
            handle.wait()

    def send_now(self, op: SendTensors) -> None:
        """Post one headerless tensor message outside a tick (a gradient sent as soon as the
        backward has it: activation/wgrad.py). It finishes like a tick's sends (Note: sends finish in the
        next tick), except that its receive may be posted a tick or more later (schedule.py, Note: the
        tick contract): the next ``exchange`` waits until then. No earlier send is waited for here,
        since nothing here takes a receive buffer."""
        start = time.perf_counter()
        sends, outgoing = self._post_tensors(op)
        nbytes = _nbytes(op.tensors)
        if sends:
            self._sending.append((Handle("send", nbytes, 2, sends, start, self.group), outgoing))
        elif nbytes:
            report("send", nbytes, time.perf_counter() - start, 2)

    def release(self, obj: Any) -> None:
        """Give a received structure's (or gradient list's) buffers back to the pool."""
        for t in leaves(obj):
            self.pool.give(t)

    def abandon_ahead(self, why: str) -> None:
        """A batch stopped with receives posted ahead: they can still take later messages (by tag on gloo,
        by order on NCCL), so from now on every exchange raises, naming ``why``."""
        if self._ahead:
            self._abandoned = f"{why}, leaving receives posted ahead from ranks {sorted(self._ahead)}"
            self._ahead = {}

    def _check_usable(self) -> None:
        if self._abandoned is not None:
            raise RuntimeError(f"pipeline p2p: {self._abandoned}; they may still take this link's next messages, "
                               "so it cannot be used again: restart the pipeline's ranks together")

    def post_ahead(self, op: RecvObj) -> None:
        """Post ``op``'s receives now, for the exchange that will list it (Note: receives posted ahead)."""
        self._check_usable()
        if op.peer in self._ahead:
            raise RuntimeError(f"pipeline p2p: a receive from rank {op.peer} is already posted ahead (tag "
                               f"{self._ahead[op.peer].tag}); only the next structure on a link can be")
        busy = frozenset(t.untyped_storage().data_ptr() for _, keep in self._sending for t in keep
                         if torch.is_tensor(t))
        self._ahead[op.peer] = self._post_recv(op, busy)

    def pending_ahead(self) -> list[tuple[int, int]]:
        """(peer, tag) of the receives posted ahead that no exchange has taken yet."""
        return [(peer, r.tag) for peer, r in self._ahead.items()]

    def _post_recv(self, op: RecvObj, busy: frozenset[int] = frozenset()) -> _PostedRecv:
        """Post a structure's header receive and, when its layout is predicted, its payload receives."""
        slot = torch.empty(HEADER_SLOT, dtype=torch.int64, device=self.device)
        header = self._irecv(slot, op.peer, op.tag, _KIND_HEADER)
        link = self._recv_layout.get(op.peer)
        guess = link.guess() if link is not None else None
        if guess is None:
            return _PostedRecv(op.tag, slot, header, None)
        bufs = [self.pool.take(s, busy) for s in guess.specs]
        works = [self._irecv(b, op.peer, op.tag, _KIND_PREDICTED) for b in bufs if b.numel()]
        return _PostedRecv(op.tag, slot, header, (guess, bufs, works))

    def exchange(self, ops: Sequence[Op]) -> list[Any]:
        """Run one tick's messages (Note: one tick, two phases). Returns, per op, the received
        structure or tensor list, None for sends."""
        self._check_usable()
        self.flush()  # before any receive can reuse a buffer an earlier send still reads
        start = time.perf_counter()
        sends: list[Any] = []
        recvs: list[Any] = []
        keep: list[Any] = []  # what the sends read, alive until they are waited on
        sent = received = 0
        payloads: dict[int, list[torch.Tensor]] = {}  # sent in phase B: the receiver could not predict them
        overflow: dict[int, torch.Tensor] = {}  # header codes beyond the slot, sent first in phase B
        results: list[Any] = [None] * len(ops)
        # phase A: headers, each with the payload the receiver predicts (or fillers)
        for i, op in enumerate(ops):
            if isinstance(op, SendObj):
                codes, tensors = encode(op.obj)
                tensors = [t.contiguous() for t in tensors]
                link = self._sent_layout.get(op.peer)
                guess = link.guess() if link is not None else None  # what the receiver has posted
                cap = HEADER_SLOT - 2
                head = torch.tensor([len(codes), _checksum(guess), *codes[:cap]] + [0] * max(0, cap - len(codes)),
                                    dtype=torch.int64, device=self.device)
                sends.append(self._isend(head, op.peer, op.tag, _KIND_HEADER))
                keep.append(head)
                sent += 8 * (HEADER_SLOT + max(0, len(codes) - cap))
                if guess is None or guess.codes != codes:
                    payloads[i] = tensors
                    # the receiver's predicted buffers take fillers of their own shapes
                    tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in guess.specs] if (
                        guess is not None) else []
                sends += [self._isend(t, op.peer, op.tag, _KIND_PREDICTED) for t in tensors if t.numel()]
                keep += tensors
                sent += _nbytes(tensors)
                if len(codes) > cap:  # phase B's, first: the receiver posts it once it read the header
                    overflow[i] = torch.tensor(codes[cap:], dtype=torch.int64, device=self.device)
                _Link.record(self._sent_layout, op.peer, codes)
        posted: dict[int, _PostedRecv] = {}
        for i, op in enumerate(ops):
            if isinstance(op, RecvObj):
                ahead = self._ahead.pop(op.peer, None)
                if ahead is not None and ahead.tag != op.tag:
                    raise RuntimeError(f"pipeline p2p: the receive from rank {op.peer} posted ahead was for tag "
                                       f"{ahead.tag}, and this exchange receives tag {op.tag} from it first")
                posted[i] = ahead if ahead is not None else self._post_recv(op)
        slots = {i: r.slot for i, r in posted.items()}
        header_works = {i: r.header for i, r in posted.items()}
        guessed = {i: r.guessed for i, r in posted.items() if r.guessed is not None}
        for i, op in enumerate(ops):
            if isinstance(op, SendTensors):
                works, outgoing = self._post_tensors(op)
                sends += works
                keep += outgoing
                sent += _nbytes(op.tensors)
            elif isinstance(op, RecvTensors):
                bufs = [self.pool.take(s) for s in op.specs]
                recvs += [self._irecv(b, op.peer, op.tag, _KIND_TENSORS) for b in bufs if b.numel()]
                received += _nbytes(bufs)
                results[i] = bufs
        codes_of: dict[int, list[int]] = {}  # the layout each header announced
        unread: dict[int, tuple[torch.Tensor, Any]] = {}  # header overflows, received in phase B
        for i, slot in slots.items():
            peer = ops[i].peer
            guess, bufs, works = guessed.get(i, (None, [], []))
            for work in works:
                # the sender posts something into every predicted receive in its phase A, and those bytes
                # come after its header: waiting for them first leaves the header received, one wake-up
                self._wait(work, peer, _nbytes(bufs))
            self._wait(header_works[i], peer, HEADER_SLOT * 8)
            n, check, cap = int(slot[0]), int(slot[1]), HEADER_SLOT - 2
            if check != _checksum(guess):
                raise RuntimeError(f"pipeline p2p: rank {peer} and this rank disagree about the layout of the last "
                                   "structures between them (Note: predicted layouts in comm/p2p.py); an earlier "
                                   "exchange must have failed part-way. Restart the batch's ranks together")
            codes_of[i] = slot[2:2 + min(n, cap)].tolist()
            if n > cap:  # posted here, after this tick's tensor messages, as the sender posts it (NCCL's order)
                rest = torch.empty(n - cap, dtype=torch.int64, device=self.device)
                unread[i] = (rest, self._irecv(rest, peer, ops[i].tag, _KIND_OVERFLOW))
        # phase B: header overflows, then the payloads nobody could predict, into buffers the headers sized
        for i, rest in overflow.items():
            sends.append(self._isend(rest, ops[i].peer, ops[i].tag, _KIND_OVERFLOW))
            keep.append(rest)
        for i, (rest, work) in unread.items():
            self._wait(work, ops[i].peer, rest.numel() * 8)
            codes_of[i] += rest.tolist()
        layouts: dict[int, Layout] = {}  # receives whose payload comes in phase B
        fillers: list[torch.Tensor] = []  # predicted buffers that got fillers: back to the pool once received
        for i, codes in codes_of.items():
            guess, bufs, _ = guessed.get(i, (None, [], []))
            received += 8 * (HEADER_SLOT + max(0, len(codes) - (HEADER_SLOT - 2))) + _nbytes(bufs)
            link = _Link.record(self._recv_layout, ops[i].peer, codes)
            if guess is not None and guess.codes == codes:
                self.predicted += 1
                results[i] = guess.received(bufs)
            else:
                fillers += bufs
                layouts[i] = link.layout
        for i, tensors in payloads.items():
            sends += [self._isend(t, ops[i].peer, ops[i].tag, _KIND_PAYLOAD) for t in tensors if t.numel()]
            keep += tensors
            sent += _nbytes(tensors)
        for i, layout in layouts.items():
            bufs = [self.pool.take(s) for s in layout.specs]
            recvs += [self._irecv(b, ops[i].peer, ops[i].tag, _KIND_PAYLOAD) for b in bufs if b.numel()]
            received += _nbytes(bufs)
            results[i] = layout.received(bufs)
        # one report per direction and tick. A gloo Work waited twice never returns (measured), so
        # the header and predicted receives, already waited, are not in ``recvs``. The sends are waited on at the
        # next exchange or flush(): nothing here needs them done, and the next tick's compute overlaps them.
        Handle("recv", received, 2, recvs, start, self.group).wait()
        for b in fillers:
            self.pool.give(b)
        if received and not recvs:
            report("recv", received, time.perf_counter() - start, 2)
        if sends:
            self._sending.append((Handle("send", sent, 2, sends, start, self.group), keep))
        elif sent:
            report("send", sent, time.perf_counter() - start, 2)
        return results

    def _post_tensors(self, op: SendTensors) -> tuple[list[Any], list[torch.Tensor]]:
        """Post a headerless tensor message: (its works, the tensors they read)."""
        outgoing = [t.contiguous() for t in op.tensors if t.numel()]
        return [self._isend(t, op.peer, op.tag, _KIND_TENSORS) for t in outgoing], outgoing

    def _wait(self, work: Any, peer: int, nbytes: int) -> None:
        """Wait for one receive of phase A; a lost peer becomes the comm layer's error, naming it."""
        try:
            work.wait()
        except RuntimeError as e:
            if health.is_comm_failure(e):
                raise health.explain(f"pipeline receive from rank {peer}", nbytes, self.group, e) from e
            raise

    def _isend(self, t: torch.Tensor, peer: int, tag: int, kind: int) -> Any:
        return dist.isend(t, dst=peer, group=self.group, tag=tag << _KIND_BITS | kind)

    def _irecv(self, t: torch.Tensor, peer: int, tag: int, kind: int) -> Any:
        return dist.irecv(t, src=peer, group=self.group, tag=tag << _KIND_BITS | kind)
