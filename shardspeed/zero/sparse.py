"""Sparse (index-slice) reduction of embedding gradients: ``"sparse_gradients": true``.

An embedding's gradient touches the rows of the tokens in the batch, a few of a large table; the
dense reduction sends the whole table. Here each rank sends only its touched rows: local rows are
coalesced (duplicates summed), counts, indices and values are all-gathered from every data-parallel
rank in one collective (Note: one gather per step), coalesced again and divided by the
data-parallel size. One ``SparseReducer`` serves every stage;
the strategies differ only in where the average lands (zero/stage0.py, zero/sharded.py).

[Note: one bucket per table] With the flag on, every trainable ``nn.Embedding`` /
``nn.EmbeddingBag`` weight gets a bucket of its own (``plan_buckets(alone=...)``), so a table's
reduction never shares a collective with dense parameters and, at stages 1/2, the table is still
partitioned like any bucket: each rank keeps its flat shard of the parameters, gradients and
optimizer state, and checkpoints and ``zero_to_fp32`` see ordinary pieces.

[Note: two meanings, both exact]
- A table built with dense gradients (``sparse=False``): its local gradient is the dense bucket view.
  The touched rows are its nonzero rows (Note: touched rows). The reduced slices are written back
  densely (zeros elsewhere), so any optimizer sees exactly what a dense all-reduce gives: the flag
  changes communication only.
- A table built with ``sparse=True``: autograd's sparse gradients are kept aside per micro-batch
  (never densified), reduced once per step at the boundary, and handed to the optimizer as a sparse
  tensor whose indices are the rows some rank's batch looked up (even if their sum is zero), which
  is what ``torch.optim.SparseAdam`` on a single process sees. At stages 1/2 the optimizer holds a
  flat shard, so the gradient is the shard's part as a 1-D sparse tensor of element indices: Adam,
  SparseAdam, Adagrad and SGD are element-wise, so the update is the same. The table stays
  partitioned (not replicated): each rank keeps 1/N of its optimizer state, and after a lazy step
  only the changed rows are published to the other ranks, not the whole table (zero/sharded.py,
  Note: lazy updates publish their rows).

[Note: touched rows] For a dense table the rows to send are found as the nonzero rows of the local
gradient, not from indices recorded in forward. It is exact: a row left out is all zeros, adding it
changes no sum (a -0.0 row may come back +0.0, which no optimizer tells apart); NaN and inf are
nonzero, so an fp16 overflow still reaches the norm. Forward hooks would miss what they cannot see:
weights tied to a head (every row gets a gradient), ``padding_idx`` rows (looked up, no gradient),
lookups under activation recompute, F.embedding on the weight directly. The cost, one read of the
table per step, is far below sending it.

[Note: one gather per step] gloo has no variable-size all-gather, so every rank must know the
gather's size before it starts; exchanging the counts first costs a whole collective, about as long
as the rows' own gather at RScan's size (measured: 1.2 ms vs 2.8 ms for indices and values as two
gathers, on top of a step of 90 ms). So each table's gather carries a capacity of slices per rank,
set from the counts of the previous step with an eighth of headroom (at RScan's batches a step's
largest count exceeds the previous one's by 16 % at most, and by more than an eighth in 1 step of
200), and each rank packs its count, indices and values into one buffer of that size
(comm.all_gather_slices). Every rank reads every count from the result, so all take the same next
decision: when some count is larger than the capacity, a second gather sized to the largest count
follows (``regathers``). A table's first step has no counts yet and exchanges them first. The
values travel bit for bit; the padding is cut off before coalescing, so the result is the one a
gather of exact sizes gives.

[Note: fallback] Every rank learns every count, so all take the same per-step decision: when the
padded gathers (world x max count x (row bytes + 8 index bytes)) would be larger than the dense
table, the step reduces densely instead (a tied head makes every row dense, say). The capacity
never exceeds that size, so a gather that turns out to be in vain costs less than the table. A
``sparse=True`` table's fallback all-reduces its rows and a touched flag per row in one buffer, so
the lazy update still knows which rows were looked up.

[Note: an unused table has no gradient] A ``sparse=True`` table that no rank's batch looked up in a
step has, on a single process, ``.grad`` None: torch's optimizers then skip it and do not count the
step (SparseAdam's bias correction depends on that count). So each rank says whether its table got
a gradient (any micro-batch called it, even with no rows) in the same exchange as the row counts
(a count of -1 means "no gradient"), and when no rank's did, the reduction gives None: the
optimizer sees no gradient and, at stages 1/2, no rows are published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shardspeed.comm import all_gather_sizes, all_gather_slices, all_reduce


@dataclass
class RowSlices:
    """Rows of a table: ``rows`` int64 [k], sorted and unique once coalesced; ``values`` [k, ...]."""

    rows: torch.Tensor
    values: torch.Tensor


def coalesce_rows(rows: torch.Tensor, values: torch.Tensor, num_rows: int) -> RowSlices:
    """Sum the values of equal rows (in fp32), rows sorted."""
    values = values.to(torch.float32)
    if rows.numel() == 0:
        return RowSlices(rows.to(torch.int64), values)
    sp = torch.sparse_coo_tensor(rows.view(1, -1), values, (num_rows, *values.shape[1:]),
                                 check_invariants=False).coalesce()
    return RowSlices(sp.indices()[0], sp.values())


def nonzero_rows(dense: torch.Tensor) -> RowSlices:
    """The rows of a dense gradient with any nonzero (or NaN) element (Note: touched rows)."""
    flat = dense.reshape(dense.shape[0], -1)
    rows = (flat != 0).any(dim=1).nonzero().view(-1)
    return RowSlices(rows, dense[rows])


def embedding_tables(module: torch.nn.Module) -> dict[int, bool]:
    """id(weight) -> built with ``sparse=True``, for the trainable embedding tables of ``module``."""
    out: dict[int, bool] = {}
    for m in module.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.weight.requires_grad:
            out[id(m.weight)] = bool(out.get(id(m.weight), False) or m.sparse)
    return out


@dataclass
class SparseTable:
    """A ``sparse=True`` table's gradients for one step: autograd's sparse gradients of each
    micro-batch (kept aside, so the module's ``.grad`` stays None) and, after the reduction, the
    sparse gradient the optimizer sees."""

    name: str
    shape: tuple[int, ...]
    parts: list[torch.Tensor] = field(default_factory=list)
    grad: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # the rows of ``grad`` (the same on every rank), until clear()
    unused: bool = False  # no rank's table got a gradient this step (Note: an unused table has no gradient)

    def take(self, grad: torch.Tensor) -> None:
        if not grad.is_sparse:
            raise RuntimeError(
                f"embedding '{self.name}' was built with sparse=True but received a dense gradient (is its weight "
                "shared with another layer, such as a tied output head?); build it with sparse=False, which "
                "sparse_gradients reduces as index slices too")
        self.parts.append(grad)

    def used(self) -> bool:
        """Whether some micro-batch of this step gave this rank a gradient (Note: an unused table
        has no gradient)."""
        return bool(self.parts)

    def local(self) -> RowSlices:
        """This rank's rows of the step, coalesced."""
        if not self.parts:
            return RowSlices(torch.zeros(0, dtype=torch.int64), torch.zeros(0, *self.shape[1:]))
        rows = torch.cat([p._indices()[0] for p in self.parts])
        return coalesce_rows(rows, torch.cat([p._values() for p in self.parts]), self.shape[0])

    def values(self) -> torch.Tensor:
        """The reduced gradient's stored values (what norms and scaling act on); none before it exists."""
        return torch.zeros(0) if self.grad is None else self.grad._values()

    def clear(self) -> None:
        self.parts.clear()
        self.grad = None
        self.rows = None
        self.unused = False


def table_buckets(named_params: list[tuple[str, torch.nn.Parameter]], tables: dict[int, bool],
                  bucket_of: dict[int, Any]) -> tuple[set[int], dict[int, SparseTable]]:
    """Each embedding table's own bucket (Note: one bucket per table), by ``id(bucket)``: the set of
    dense-gradient tables' and the ``SparseTable`` of each ``sparse=True`` one. ``tables`` is
    ``embedding_tables(module)``; ``bucket_of`` maps ``id(param)`` to the bucket holding it."""
    dense: set[int] = set()
    sparse: dict[int, SparseTable] = {}
    for name, p in named_params:
        if id(p) in tables:
            bucket = bucket_of[id(p)]
            if tables[id(p)]:
                sparse[id(bucket)] = SparseTable(name, tuple(p.shape))
            else:
                dense.add(id(bucket))
    return dense, sparse


def as_sparse(s: RowSlices, shape: tuple[int, ...]) -> torch.Tensor:
    """The slices as a coalesced sparse tensor of ``shape`` (stage 0's optimizer sees this)."""
    return torch.sparse_coo_tensor(s.rows.view(1, -1), s.values, shape, is_coalesced=True, check_invariants=False)


def shard_of(s: RowSlices, lo: int, hi: int) -> torch.Tensor:
    """The part of the slices that falls into the flat range [lo, hi) of the table (at offset 0 of
    its bucket), as a coalesced 1-D sparse tensor of ``hi - lo`` elements (stages 1/2)."""
    row_numel = s.values[0].numel() if s.values.shape[0] else 1
    elems = (s.rows.view(-1, 1) * row_numel + torch.arange(row_numel, device=s.rows.device)).view(-1)
    keep = (elems >= lo) & (elems < hi)
    vals = s.values.reshape(-1)[keep]
    return torch.sparse_coo_tensor((elems[keep] - lo).view(1, -1), vals, (hi - lo,), is_coalesced=True,
                                   check_invariants=False)


class SparseReducer:
    """Averages embedding gradients over the data-parallel group as index slices (module note)."""

    def __init__(self, group: object, world: int, reduce_dtype: torch.dtype):
        self.group, self.world, self.reduce_dtype = group, world, reduce_dtype
        self.dense_steps = 0  # reductions that fell back to dense (Note: fallback), for tests and logs
        self.regathers = 0  # second gathers after a count outgrew the capacity (Note: one gather per step)
        self._capacity: dict[str, int] = {}  # table -> slices per rank the next gather carries

    def _gather(self, local: RowSlices, num_rows: int, used: bool = True, key: str = "") -> RowSlices | bool:
        """The summed slices of every rank; True when dense is cheaper (Note: fallback); False when
        no rank's table got a gradient (Note: an unused table has no gradient). ``key`` names the
        table, whose counts size its next gather (Note: one gather per step)."""
        row_numel = _numel(local.values.shape[1:])
        esize = torch.tensor([], dtype=self.reduce_dtype).element_size()
        # the most slices a rank may send before the padded gathers outweigh the table (Note: fallback)
        limit = num_rows * row_numel * esize // (self.world * (row_numel * esize + 8))
        mine = local.rows.numel() if used else -1
        values = local.values.to(self.reduce_dtype)
        cap = self._capacity.get(key, 0)
        gathered = None
        if cap:
            sizes, *gathered = all_gather_slices(local.rows, values, mine, cap, self.group)
        else:  # first step of this table (or one too small to ever go sparse): counts first
            sizes = all_gather_sizes(mine, self.group, local.rows.device)
        if max(sizes) < 0:
            return False
        counts = [max(n, 0) for n in sizes]
        most = max(counts)
        self._capacity[key] = min(limit, most + most // 8 + 8)
        if most > limit:
            self.dense_steps += 1
            return True
        if most == 0:  # no rank touched a row
            return RowSlices(local.rows, local.values.to(torch.float32))
        if gathered is None or most > cap:
            self.regathers += gathered is not None
            _, *gathered = all_gather_slices(local.rows, values, mine, most, self.group)
        rows, vals = gathered
        return coalesce_rows(torch.cat([rows[r, :c] for r, c in enumerate(counts)]),
                             torch.cat([vals[r, :c] for r, c in enumerate(counts)]), num_rows)

    @torch.no_grad()
    def reduce_dense(self, grad: torch.Tensor, key: str = "") -> None:
        """Replace a dense table gradient ``grad`` [rows, ...] by its average over the group; ``key``
        names the table."""
        summed = self._gather(nonzero_rows(grad), grad.shape[0], key=key)
        if not isinstance(summed, RowSlices):  # a dense table always has a gradient: True, dense is cheaper
            wire = grad if grad.dtype == self.reduce_dtype else grad.to(self.reduce_dtype)
            all_reduce(wire, group=self.group)
            if wire is not grad:
                grad.copy_(wire)
            grad.div_(self.world)
            return
        grad.zero_()
        grad.index_copy_(0, summed.rows, summed.values.div_(self.world).to(grad.dtype))

    @torch.no_grad()
    def reduce_sparse(self, local: RowSlices, num_rows: int, used: bool = True, key: str = "") -> RowSlices | None:
        """The average over the group of a ``sparse=True`` table's coalesced local slices; its rows
        are those looked up on some rank. ``used``: whether this rank's table got a gradient this
        step; None when no rank's did (Note: an unused table has no gradient)."""
        summed = self._gather(local, num_rows, used, key)
        if summed is False:
            return None
        if not isinstance(summed, RowSlices):  # dense is cheaper: rows and a touched flag per row, in one all-reduce
            row_shape = local.values.shape[1:]
            row_numel = _numel(row_shape)
            packed = torch.zeros(num_rows, row_numel + 1, dtype=self.reduce_dtype, device=local.rows.device)
            # explicit row numel: a rank that looked up no row has [0, *row_shape] values, which
            # reshape(0, -1) cannot size
            packed[local.rows, :-1] = local.values.reshape(len(local.rows), row_numel).to(self.reduce_dtype)
            packed[local.rows, -1] = 1
            all_reduce(packed, group=self.group)
            rows = packed[:, -1].nonzero().view(-1)
            summed = RowSlices(rows, packed[rows, :-1].to(torch.float32).view(len(rows), *row_shape))
        summed.values.div_(self.world)
        return summed


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
