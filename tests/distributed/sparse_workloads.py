"""A tiny embedding + GRU model for sparse_gradients, its data, an engine run and the single-process
reference (tests/distributed/test_sparse_gradients.py).

The embedding is used only for samples that have text (ids >= 0); a sample without text takes a
learned vector instead. At ``EMPTY_STEP`` rank 1's samples have none, so its batch touches no row
of the table while rank 0's does.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB, DIM, SEQ, HIDDEN = 1000, 8, 5, 12
EMPTY_STEP = 3


class TextModel(torch.nn.Module):
    def __init__(self, sparse: bool = False, vocab: int = VOCAB, bag: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.bag = bag
        if bag:
            self.emb = torch.nn.EmbeddingBag(vocab, DIM, mode="sum", sparse=sparse)
        else:
            self.emb = torch.nn.Embedding(vocab, DIM, sparse=sparse)
        self.gru = torch.nn.GRU(DIM, HIDDEN, batch_first=True)
        self.blank = torch.nn.Parameter(torch.randn(HIDDEN) * 0.1)
        self.head = torch.nn.Linear(HIDDEN, 1)

    def forward(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        has_text = (ids >= 0).all(dim=1)
        feats = self.blank.expand(ids.shape[0], HIDDEN).clone()
        text = ids[has_text]
        if self.bag:  # one bag per sample: the GRU reads a sequence of length 1
            seq = self.emb(text).unsqueeze(1)
        else:
            seq = self.emb(text)
        if text.shape[0]:
            _, h = self.gru(seq)
            feats[has_text] = h[-1]
        logits = self.head(torch.tanh(feats)).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)


def global_batch(step: int, world: int, per_rank: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s samples, rank r's are [r * per_rank, (r + 1) * per_rank). Token ids come from a
    narrow window of the vocabulary (a few rows per step, some repeated within a batch)."""
    g = torch.Generator().manual_seed(1000 + step)
    lo = int(torch.randint(0, max(1, vocab - 40), (1,), generator=g))
    ids = torch.randint(lo, min(vocab, lo + 40), (world * per_rank, SEQ), generator=g)
    ids[torch.rand(world * per_rank, generator=g) < 0.25] = -1  # some samples without text
    if step == EMPTY_STEP and world > 1:
        ids[per_rank:2 * per_rank] = -1  # rank 1 touches no row of the table
    y = (torch.rand(world * per_rank, generator=g) < 0.5).float()
    return ids, y


def micro_batches(step: int, rank: int, world: int, micro: int, gas: int, vocab: int = VOCAB):
    ids, y = global_batch(step, world, micro * gas, vocab)
    mine = slice(rank * micro * gas, (rank + 1) * micro * gas)
    ids, y = ids[mine], y[mine]
    return [(ids[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]) for m in range(gas)]


def sparse_engine_run(rank: int, config: dict, steps: int, model_kwargs: dict | None = None,
                      client_optimizer: Any = None, save_dir: str | None = None,
                      load_dir: str | None = None, poison: int | None = None) -> dict[str, Any]:
    """``poison``: at that step rank 1's embedding output gets an infinite gradient, so only the
    table's gradient overflows there."""
    import shardspeed

    model = TextModel(**(model_kwargs or {}))
    optimizer = client_optimizer(model) if client_optimizer is not None else None
    engine, _, _, _ = shardspeed.initialize(model=model, config=config, optimizer=optimizer)
    vocab = (model_kwargs or {}).get("vocab", VOCAB)
    start = 0
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        start = engine.global_steps
    per_step = []
    for step in range(start, steps):
        if engine.comm_stats is not None:
            engine.comm_stats.reset()
        hook = None
        if step == poison and rank == 1:
            hook = model.emb.register_forward_hook(
                lambda m, i, out: out.register_hook(lambda g: g * float("inf")) and None)
        for ids, y in micro_batches(step, engine.topo.dp_rank, engine.dp_world_size,
                                    engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
                                    vocab):
            engine.backward(engine(ids, y))
            engine.step()
        if hook is not None:
            hook.remove()
        if engine.comm_stats is not None:
            per_step.append({**{op: s.bytes for op, s in engine.comm_stats.ops.items()},
                             **{f"{op} calls": s.calls for op, s in engine.comm_stats.ops.items()},
                             "sparse_bytes": engine.comm_stats.sparse_bytes()})
        if save_dir is not None and step == steps // 2 - 1:
            engine.save_checkpoint(save_dir)
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {"params": params, "comm": per_step, "skipped": engine.skipped_steps,
            "dense_fallbacks": engine.strategy._sparse.dense_steps, "regathers": engine.strategy._sparse.regathers,
            "grad_norm": engine.get_global_grad_norm()}


def reference_run(steps: int, world: int, per_rank: int, make_opt: Any, model_kwargs: dict | None = None,
                  clip: float = 0.0, skip: int | None = None) -> dict[str, torch.Tensor]:
    """Plain single-process PyTorch on the same global batches (no update at step ``skip``)."""
    model = TextModel(**(model_kwargs or {}))
    opts = make_opt(model)
    vocab = (model_kwargs or {}).get("vocab", VOCAB)
    for step in range(steps):
        if step == skip:
            continue
        ids, y = global_batch(step, world, per_rank, vocab)
        for o in opts:
            o.zero_grad()
        model(ids, y).backward()
        if clip:
            dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
            sq = sum(float(p.grad.pow(2).sum()) for p in dense)
            sq += sum(float(p.grad.coalesce().values().pow(2).sum()) for p in model.parameters()
                      if p.grad is not None and p.grad.is_sparse)
            coef = min(1.0, clip / (sq**0.5 + 1e-6))
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        for o in opts:
            o.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


class BagModel(torch.nn.Module):
    """EmbeddingBag (sum) times integer coefficients: integer weights and data give integer-valued
    gradients, so every reduction order sums them exactly."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(VOCAB, 4, mode="sum", sparse=sparse)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randint(-5, 6, (VOCAB, 4), generator=torch.Generator().manual_seed(0)))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return (self.emb(ids, offsets) * coef).sum()


def bag_batch(step: int, rank: int, bags: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s bags at ``step``: some empty, and all of rank 1's empty at EMPTY_STEP."""
    g = torch.Generator().manual_seed(100 * step + rank)
    sizes = torch.randint(0, 4, (bags,), generator=g)
    if step == EMPTY_STEP and rank == 1:
        sizes.zero_()
    ids = torch.randint(0, VOCAB, (int(sizes.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    coef = torch.randint(-3, 4, (bags, 4), generator=g).float()
    return ids, offsets, coef


def integer_run(rank: int, config: dict, steps: int, sparse: bool) -> dict[str, torch.Tensor]:
    import shardspeed

    engine, _, _, _ = shardspeed.initialize(model=BagModel(sparse), config=config)
    for step in range(steps):
        engine.backward(engine(*bag_batch(step, engine.topo.dp_rank)))
        engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def model_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Distance of a whole model from another, relative to its norm (low-precision runs)."""
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b)
    return (num / sum(float(b[k].float().pow(2).sum()) for k in b)) ** 0.5


def hf_bert_run(rank: int, config: dict, steps: int) -> dict[str, Any]:
    """A transformers BERT classifier from a config (3000-word vocabulary, not tied to an output)."""
    from transformers import BertConfig, BertForSequenceClassification

    import shardspeed

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=3000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    engine, _, _, _ = shardspeed.initialize(model=model, config=config)
    sparse_bytes = []
    for step in range(steps):
        g = torch.Generator().manual_seed(10 * step + rank)
        ids = torch.randint(0, 3000, (2, 12), generator=g)
        engine.comm_stats.reset()
        engine.backward(engine(input_ids=ids, labels=torch.randint(0, 2, (2,), generator=g)).loss)
        engine.step()
        sparse_bytes.append(engine.comm_stats.sparse_bytes())
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "sparse_bytes": sparse_bytes}


def runs_in_one_job(rank: int, runs: list[tuple[Any, tuple]]) -> list[Any]:
    """Several runs on the same ranks, one after another (one process start instead of several)."""
    return [fn(rank, *args) for fn, args in runs]


# -- edge cases: padding_idx, EmbeddingBag per_sample_weights, tables some micro-batches skip ---------

EDGE_VOCAB, EDGE_DIM, EDGE_UNUSED_STEP = 200, 5, 2


class EdgeModel(torch.nn.Module):
    """An EmbeddingBag with per-sample weights and a padding row, and a second table (with a padding
    row too) that only some micro-batches look up, and none at all at ``EDGE_UNUSED_STEP``."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(EDGE_VOCAB, EDGE_DIM, mode="sum", sparse=sparse, padding_idx=0)
        self.emb = torch.nn.Embedding(EDGE_VOCAB, EDGE_DIM, sparse=sparse, padding_idx=3)
        self.head = torch.nn.Linear(EDGE_DIM, 1)

    def forward(self, ids, offsets, weights, ids2):
        h = self.bag(ids, offsets, per_sample_weights=weights)
        if ids2 is not None:
            h = h + self.emb(ids2).sum(1)
        return self.head(torch.tanh(h)).pow(2).mean()


def edge_batch(step: int, rank: int, micro: int, gas: int, m: int):
    """Micro-batch ``m`` of rank ``rank``: bags of 4 ids from 12 rows (padding 0, duplicates), and 3 ids
    of the second table from 8 rows (padding 3), or None where this micro-batch skips that table."""
    samples = range((rank * gas + m) * micro, (rank * gas + m + 1) * micro)
    ids, weights, ids2 = [], [], []
    for s in samples:
        g = torch.Generator().manual_seed(1000 * step + s)
        ids.append(torch.randint(0, 12, (4,), generator=g))
        weights.append(torch.rand(4, generator=g))
        ids2.append(torch.randint(0, 8, (3,), generator=g))
    uses2 = step != EDGE_UNUSED_STEP and (step + rank + m) % 3 != 0
    return torch.cat(ids), torch.arange(micro) * 4, torch.cat(weights), torch.stack(ids2) if uses2 else None


def edge_run(rank: int, config: dict, steps: int, sparse: bool) -> dict[str, torch.Tensor]:
    import shardspeed

    engine, _, _, _ = shardspeed.initialize(model=EdgeModel(sparse), config=config)
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    for step in range(steps):
        for m in range(gas):
            engine.backward(engine(*edge_batch(step, engine.topo.dp_rank, micro, gas, m)))
            engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def edge_reference(steps: int, world: int, micro: int, gas: int, sparse: bool, clip: float, lr: float):
    """Single process: SparseAdam on the tables and Adam on the head (sparse=True), or Adam on all."""
    model = EdgeModel(sparse)
    if sparse:
        opts = [torch.optim.SparseAdam([model.bag.weight, model.emb.weight], lr=lr),
                torch.optim.Adam(model.head.parameters(), lr=lr)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=lr)]
    for step in range(steps):
        for o in opts:
            o.zero_grad()
        for r in range(world):
            for m in range(gas):
                (model(*edge_batch(step, r, micro, gas, m)) / (world * gas)).backward()
        if not sparse:  # a dense reduction gives every trainable parameter a gradient, zeros if unused
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in model.parameters() if p.grad is not None]
        sq = sum(float((g.values() if g.is_sparse else g).pow(2).sum()) for g in grads)
        coef = min(1.0, clip / (sq**0.5 + 1e-6))
        for p in model.parameters():
            if p.grad is not None:
                p.grad = (p.grad.coalesce() if p.grad.is_sparse else p.grad) * coef
        for o in opts:
            o.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class SmallTableModel(torch.nn.Module):
    """A 30-row table: one rank looking up every row makes the padded gather larger than the table."""

    def __init__(self, sparse: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30, 8, sparse=sparse)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:  # the table is still called: a gradient with no rows, as on one process
            return self.head.weight.sum() * 0 + self.emb(ids).sum()
        return self.head(self.emb(ids)).pow(2).mean()


def small_table_batch(step: int, rank: int) -> torch.Tensor:
    """Rank 1 looks up no row; rank 0 every row at step 1 (the dense fallback), three otherwise."""
    if rank == 1:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(30) if step == 1 else torch.tensor([1, 2, 2]) + step


def small_table_run(rank: int, config: dict, steps: int) -> dict[str, Any]:
    import shardspeed

    engine, _, _, _ = shardspeed.initialize(model=SmallTableModel(), config=config)
    for step in range(steps):
        engine.backward(engine(small_table_batch(step, engine.topo.dp_rank)))
        engine.step()
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "dense_fallbacks": engine.strategy._sparse.dense_steps}


def small_table_reference(steps: int, world: int, lr: float) -> dict[str, torch.Tensor]:
    model = SmallTableModel()
    opts = [torch.optim.SparseAdam([model.emb.weight], lr=lr), torch.optim.Adam(model.head.parameters(), lr=lr)]
    for step in range(steps):
        for o in opts:
            o.zero_grad()
        for r in range(world):
            (model(small_table_batch(step, r)) / world).backward()
        for o in opts:
            o.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def publish_rows_with_a_poisoned_copy(rank: int, config: dict) -> torch.Tensor:
    """Rank 1 holds inf in its copy of row 0, which rank 0's shard owns; both publish row 0 (the rows
    a lazy update changed, zero/sharded.py): the owner's value must come back, not 0 * inf = NaN."""
    import shardspeed

    engine, _, _, _ = shardspeed.initialize(model=TextModel(sparse=True), config=config)
    strategy = engine.strategy
    (bucket,) = [b for b in strategy.buckets if id(b) in strategy._sparse_tables]
    assert bucket.lo == 0 if rank == 0 else bucket.lo >= DIM  # row 0 is rank 0's
    if rank == 1:
        bucket.param_buffer[:DIM] = float("inf")
    strategy._publish_rows(bucket, torch.tensor([0]))
    return engine.module.emb.weight.detach()[0].clone()


# -- the RScan example's model (examples/rscan/model.py), tiny --------------------------------------

RSCAN = {"vocab": 1000, "emb": 8, "hidden": 8}


def rscan_model(sparse: bool) -> torch.nn.Module:
    """Bidirectional GRUs, padding_idx 0, one table shared by the query and passage encoders."""
    from examples.rscan.model import RScanConfig, RScanModel

    torch.manual_seed(0)
    return RScanModel(RScanConfig(RSCAN["vocab"], RSCAN["emb"], RSCAN["hidden"], sparse=sparse))


def rscan_batch(step: int, world: int, per_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s (queries [N, 4], passages [N, 6], labels [N]), rank r's rows [r * per_rank, ...):
    ids from a narrow window of the vocabulary, trailing padding (0); at EMPTY_STEP rank 1's rows are
    all padding, so its batch touches no row of the table (padding_idx gets no gradient)."""
    g = torch.Generator().manual_seed(2000 + step)
    n = world * per_rank
    lo = int(torch.randint(1, RSCAN["vocab"] - 40, (1,), generator=g))
    q = torch.randint(lo, lo + 40, (n, 4), generator=g)
    p = torch.randint(lo, lo + 40, (n, 6), generator=g)
    q[torch.arange(4).expand(n, 4) >= torch.randint(1, 5, (n, 1), generator=g)] = 0
    p[torch.arange(6).expand(n, 6) >= torch.randint(1, 7, (n, 1), generator=g)] = 0
    if step == EMPTY_STEP and world > 1:
        q[per_rank:2 * per_rank] = 0
        p[per_rank:2 * per_rank] = 0
    y = (torch.rand(n, generator=g) < 0.5).float()
    return q, p, y


def rscan_run(rank: int, config: dict, steps: int, sparse: bool) -> dict[str, torch.Tensor]:
    import shardspeed

    engine, _, _, _ = shardspeed.initialize(model=rscan_model(sparse), config=config)
    per_rank = engine.train_micro_batch_size_per_gpu()
    mine = slice(engine.topo.dp_rank * per_rank, (engine.topo.dp_rank + 1) * per_rank)
    for step in range(steps):
        q, p, y = rscan_batch(step, engine.dp_world_size, per_rank)
        engine.backward(engine(q[mine], p[mine], y[mine]))
        engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def rscan_reference(steps: int, world: int, per_rank: int, sparse: bool, lr: float, weight_decay: float):
    """Single process: AdamW on everything (dense table), or SparseAdam on the table + Adam elsewhere."""
    model = rscan_model(sparse)
    if sparse:
        rest = [p for n, p in model.named_parameters() if n != "embedding.weight"]
        opts = [torch.optim.SparseAdam([model.embedding.weight], lr=lr), torch.optim.Adam(rest, lr=lr)]
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)]
    for step in range(steps):
        for o in opts:
            o.zero_grad()
        model(*rscan_batch(step, world, per_rank)).backward()
        for o in opts:
            o.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# counts of rows per rank at each step of protocol_run: the capacity a step's gather carries comes from
# the step before (zero/sparse.py, Note: one gather per step), so step 2's 40 rows on rank 0 overflow it
# and step 3's rank 1 with no gradient at all (-1) and step 4's all-empty table go through the same gather
PROTOCOL_COUNTS = [(3, 5), (6, 4), (40, 2), (0, -1), (-1, -1), (7, 7)]


def protocol_slices(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Rank ``rank``'s coalesced slices at ``step`` of PROTOCOL_COUNTS: rows of a 1000-row table, 3
    values each, integers (so sums are exact whatever the order)."""
    n = PROTOCOL_COUNTS[step][rank]
    g = torch.Generator().manual_seed(10 * step + rank)
    rows = torch.randperm(1000, generator=g)[:max(n, 0)].sort().values
    values = torch.randint(-50, 50, (max(n, 0), 3), generator=g).float()
    return rows, values, n >= 0


def protocol_run(rank: int) -> list[dict[str, Any]]:
    """The SparseReducer alone over the world group, through PROTOCOL_COUNTS: each step's reduced
    slices and the collectives it took."""
    from shardspeed import comm
    from shardspeed.zero.sparse import RowSlices, SparseReducer

    comm.init_distributed("gloo")
    stats = comm.CommStats()
    comm.add_observer(stats)
    reducer = SparseReducer(comm.world_group(), comm.get_world_size(), torch.float32)
    out = []
    for step in range(len(PROTOCOL_COUNTS)):
        stats.reset()
        rows, values, used = protocol_slices(step, rank)
        got = reducer.reduce_sparse(RowSlices(rows, values), 1000, used, key="emb")
        out.append({"rows": None if got is None else got.rows, "values": None if got is None else got.values,
                    "calls": {op: s.calls for op, s in stats.ops.items()}, "regathers": reducer.regathers})
    return out
