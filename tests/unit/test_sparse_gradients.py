"""sparse_gradients in one process: the slice arithmetic, the lazy Adam step, and what a user is told."""

import pytest
import torch

import shardspeed
from shardspeed.config import ConfigError
from shardspeed.optim import FusedAdam
from shardspeed.zero.buckets import plan_buckets
from shardspeed.zero.sparse import SparseTable, coalesce_rows, embedding_tables, nonzero_rows, shard_of
from tests.distributed.sparse_workloads import TextModel, max_rel, micro_batches, reference_run


def test_a_table_gets_a_bucket_of_its_own():
    plans = plan_buckets(["a", "emb", "b", "c"], [(3,), (10, 2), (4,), (5,)], 100, alone={"emb"})
    assert [[s.name for s in p.slots] for p in plans] == [["c", "b"], ["emb"], ["a"]]


def test_coalesce_and_nonzero_rows_and_shards():
    s = coalesce_rows(torch.tensor([4, 1, 4]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 6)
    assert s.rows.tolist() == [1, 4] and s.values.tolist() == [[3.0, 4.0], [6.0, 8.0]]
    dense = torch.zeros(6, 2)
    dense[2, 1], dense[5, 0] = -1.0, float("nan")
    assert nonzero_rows(dense).rows.tolist() == [2, 5]  # NaN counts: an overflow must reach the norm
    # the flat range [3, 9) of a 6 x 2 table holds elements 3..8: row 1's second, row 4's both
    part = shard_of(s, 3, 9)
    assert part.shape == (6,) and part.indices()[0].tolist() == [0, 5] and part.values().tolist() == [4.0, 6.0]


def test_sparse_table_sums_its_micro_batches():
    t = SparseTable("emb", (5, 2))
    for rows in ([1, 3, 1], [3]):
        t.take(torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), 2), (5, 2)))
    local = t.local()
    assert local.rows.tolist() == [1, 3] and local.values[:, 0].tolist() == [2.0, 2.0]
    with pytest.raises(RuntimeError, match="embedding 'emb' was built with sparse=True but received a dense"):
        t.take(torch.zeros(5, 2))


def test_embedding_tables_found_with_their_kind():
    m = TextModel(sparse=True)
    assert embedding_tables(m) == {id(m.emb.weight): True}
    bag = TextModel(bag=True)
    assert embedding_tables(bag) == {id(bag.emb.weight): False}
    bag.emb.weight.requires_grad_(False)
    assert embedding_tables(bag) == {}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adam_steps_sparse_gradients_as_sparse_adam(weight_decay):
    torch.manual_seed(0)
    table, other = torch.randn(20, 3), torch.randn(4)
    ours = [table.clone().requires_grad_(), other.clone().requires_grad_()]
    ref = [table.clone().requires_grad_(), other.clone().requires_grad_()]
    opt = FusedAdam(ours, lr=0.1, weight_decay=weight_decay)
    ref_sparse, ref_dense = torch.optim.SparseAdam([ref[0]], lr=0.1), torch.optim.AdamW([ref[1]], lr=0.1,
                                                                                          weight_decay=weight_decay)
    for step in range(4):
        rows = torch.tensor([[step, 7, 7]]) if step != 2 else torch.zeros(1, 0, dtype=torch.int64)
        g = torch.sparse_coo_tensor(rows, torch.randn(rows.shape[1], 3), (20, 3))
        dg = torch.randn(4)
        ours[0].grad, ref[0].grad = g, g.clone()
        ours[1].grad, ref[1].grad = dg, dg.clone()
        if weight_decay:  # SparseAdam has none: the lazy decay shrinks the touched rows only
            rows_now = g.coalesce().indices()[0]
            ref[0].data[rows_now] *= 1 - 0.1 * weight_decay
        opt.step()
        ref_sparse.step()
        ref_dense.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the table's update is SparseAdam's arithmetic, so bit for bit (optim/adam.py, Note: sparse gradients
    # are lazy); the decayed rows went through the same multiply in both
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(opt.state[ours[0]]["exp_avg_sq"], ref_sparse.state[ref[0]]["exp_avg_sq"])
    assert torch.equal(ours[0][10:], table[10:])  # rows never looked up never move
    assert opt.state[ours[0]]["step"].item() == 4


def test_fused_adam_maximize_on_a_sparse_gradient_is_sparse_adams():
    torch.manual_seed(1)
    table = torch.randn(10, 2)
    ours, ref = table.clone().requires_grad_(), table.clone().requires_grad_()
    opt = FusedAdam([ours], lr=0.1)
    opt.param_groups[0]["maximize"] = True  # torch's Adam option, kept in the group
    ref_opt = torch.optim.SparseAdam([ref], lr=0.1, maximize=True)
    for step in range(3):
        g = torch.sparse_coo_tensor(torch.tensor([[step, 4]]), torch.randn(2, 2), (10, 2))
        ours.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ours, ref)


def _engine(model, config, **kw):
    config = {"train_batch_size": 3, "steps_per_print": None, "sparse_gradients": True, **config}
    return shardspeed.initialize(model=model, config=config, **kw)[0]


def test_single_process_sparse_table_equals_sparse_adam_plus_adam():
    engine = _engine(TextModel(sparse=True), {"optimizer": {"type": "Adam", "params": {"lr": 1e-2}}})
    for step in range(5):
        for ids, y in micro_batches(step, 0, 1, 3, 1):
            engine.backward(engine(ids, y))
            engine.step()

    def make(m):
        rest = [p for n, p in m.named_parameters() if n != "emb.weight"]
        return [torch.optim.SparseAdam([m.emb.weight], lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]

    ref = reference_run(5, 1, 3, make, {"sparse": True})
    assert max_rel({n: p.detach() for n, p in engine.module.named_parameters()}, ref) < 1e-5


def test_stage3_is_refused():
    with pytest.raises(ConfigError, match="sparse_gradients is supported at ZeRO stages 0, 1 and 2: stage 3"):
        _engine(TextModel(), {"optimizer": {"type": "Adam", "params": {}}, "zero_optimization": {"stage": 3}})


def test_optimizer_that_cannot_take_sparse_gradients_is_refused_by_parameter():
    m = TextModel(sparse=True)
    with pytest.raises(ConfigError, match=r"embedding 'emb.weight' is built with sparse=True.*which Adam cannot take: "
                                          r"use the config's Adam or AdamW"):
        _engine(m, {}, optimizer=torch.optim.Adam(m.parameters(), lr=1e-3))
    with pytest.raises(ConfigError, match="which FusedLamb cannot take"):
        _engine(TextModel(sparse=True), {"optimizer": {"type": "Lamb", "params": {}}})


def test_client_sparse_adam_takes_the_tables_only():
    m = TextModel(sparse=True)
    with pytest.raises(ConfigError, match="torch.optim.SparseAdam holds 'blank', whose gradient is dense"):
        _engine(m, {}, optimizer=torch.optim.SparseAdam(m.parameters(), lr=1e-3))
    m = TextModel(sparse=True)
    engine = _engine(m, {}, optimizer=torch.optim.SparseAdam([m.emb.weight], lr=1e-3))
    before = m.emb.weight.detach().clone()
    ids, y = micro_batches(0, 0, 1, 3, 1)[0]
    engine.backward(engine(ids, y))
    engine.step()
    moved = (m.emb.weight.detach() != before).any(dim=1).nonzero().view(-1)
    assert set(moved.tolist()) == set(ids[ids >= 0].unique().tolist())


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 4, sparse=True)
        self.head = torch.nn.Linear(4, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids)).logsumexp(-1).mean()


def test_sparse_table_tied_to_a_dense_head_is_explained():
    engine = _engine(Tied(), {"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {}}})
    with pytest.raises(RuntimeError, match="embedding 'emb.weight' was built with sparse=True but received a dense "
                                           "gradient .*tied output head"):
        engine.backward(engine(torch.tensor([[1, 2]])))


@pytest.mark.parametrize(("kind", "make"), [("SGD", lambda ps: torch.optim.SGD(ps, lr=0.1)),
                                            ("Adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.1))])
def test_sgd_and_adagrad_take_sparse_table_gradients_natively(kind, make):
    engine = _engine(TextModel(sparse=True), {"optimizer": {"type": kind, "params": {"lr": 0.1}}})
    for step in range(4):
        for ids, y in micro_batches(step, 0, 1, 3, 1):
            engine.backward(engine(ids, y))
            engine.step()
    ref = reference_run(4, 1, 3, lambda m: [make(m.parameters())], {"sparse": True})
    assert max_rel({n: p.detach() for n, p in engine.module.named_parameters()}, ref) < 1e-5


@pytest.mark.parametrize("kind", ["SGD", "Adagrad"])
@pytest.mark.parametrize("stage", [0, 2])
def test_sgd_and_adagrad_weight_decay_on_a_sparse_table_is_refused_by_parameter(kind, stage):
    """torch would fail at the first step without naming the parameter (SGD: sparse + dense add;
    Adagrad: weight_decay is not compatible with sparse gradients); refused at initialize instead."""
    cfg = {"optimizer": {"type": kind, "params": {"lr": 0.1, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage}}
    with pytest.raises(ConfigError, match=rf"embedding 'emb.weight' is built with sparse=True, .* reaches {kind} as a "
                                          rf"sparse tensor, and {kind} cannot apply weight_decay \(0.01 in param "
                                          r"group 0\) to a sparse gradient: set weight_decay 0 for that table"):
        _engine(TextModel(sparse=True), cfg)
    # weight decay on the other parameters only is accepted
    m = TextModel(sparse=True)
    rest = [p for n, p in m.named_parameters() if n != "emb.weight"]
    opt = getattr(torch.optim, kind)([{"params": [m.emb.weight]}, {"params": rest, "weight_decay": 0.01}], lr=0.1)
    _engine(m, {"zero_optimization": {"stage": stage}}, optimizer=opt)
