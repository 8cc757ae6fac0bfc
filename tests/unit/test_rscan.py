"""examples/rscan pieces in process: hashing tokeniser, pair mining and split (deterministic), batches,
the AUC (against a brute-force pair count), and reading an LR range test."""

import itertools
import math
import textwrap

import pytest
import torch

from examples.rscan.data import (
    EVAL_NEGATIVES,
    PASSAGE_LEN,
    QUERY_LEN,
    Pair,
    RScanData,
    encode,
    is_held_out,
    mine_pairs,
    split,
    token_id,
    words,
)
from examples.rscan.metrics import auc
from shardspeed.optim import range_test_params, suggest_one_cycle
from shardspeed.optim.schedules import LRRangeTest


def test_words_and_hashing_are_stable():
    assert words("getItem_at(x2) HTTPServer") == ["get", "item", "at", "x2", "httpserver"]
    # BLAKE2b, not Python's salted hash(): the same ids in every process and on every machine
    assert token_id("return", 1000) == 28 and token_id("tensor", 300_000) == 78213
    ids = [token_id(w, 7) for w in ["a", "b", "c", "return", "tensor", "x" * 50]]
    assert all(1 <= i <= 6 for i in ids)  # row 0 is padding
    assert encode("Return the Tensor", 5, 1000) == [28, token_id("the", 1000), token_id("tensor", 1000), 0, 0]
    with pytest.raises(ValueError, match="vocab 1: a hashed vocabulary needs at least 2 rows"):
        token_id("x", 1)


def test_split_is_a_function_of_the_passage():
    pairs = [Pair(f"q {i}", f"passage {i}") for i in range(2000)]
    held = [p for p in pairs if is_held_out(p)]
    assert 150 < len(held) < 250  # ~10 %
    assert is_held_out(Pair("a", "passage 8")) and not is_held_out(Pair("a", "passage 7"))
    assert is_held_out(Pair("another query", "passage 8"))  # the query does not move a pair
    train, held2 = split(list(reversed(pairs)))
    assert set(held2) == set(held) and len(train) + len(held2) == len(pairs)


def test_mining_reads_defs_with_docstrings_skips_tests_and_duplicates(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(textwrap.dedent('''
        def get_default_dtype():
            """Return the default floating point dtype."""
        def __init__(self):
            """Dunders are not queries."""
        def undocumented():
            pass
        def x():
            """A name with no word of two letters."""
        class K:
            async def readLines(self):
                """Read all lines of the stream."""
        '''))
    (tmp_path / "pkg" / "b.py").write_text(
        'def copy_default_dtype():\n    """Return the default floating point dtype."""\n')
    (tmp_path / "pkg" / "broken.py").write_text("def (:\n")
    (tmp_path / "pkg" / "tests" / "t.py").write_text('def test_it():\n    """Tests are skipped."""\n')
    pairs = mine_pairs([str(tmp_path)])
    assert pairs == [Pair("get default dtype", "return the default floating point dtype"),
                     Pair("read lines", "read all lines of the stream")]
    assert mine_pairs([str(tmp_path)]) == pairs


def _data(n=40, vocab=500):
    return RScanData([Pair(f"query {i} w{i}", f"passage number {i} about w{i}") for i in range(n)], vocab)


def test_train_batches_are_deterministic_and_interleave_positive_negative():
    d = _data()
    q, p, y = d.train_batch(step=3, size=16, seed=5)
    q2, p2, y2 = d.train_batch(step=3, size=16, seed=5)
    assert torch.equal(q, q2) and torch.equal(p, p2) and torch.equal(y, y2)
    assert q.shape == (32, QUERY_LEN) and p.shape == (32, PASSAGE_LEN) and y.tolist() == [1.0, 0.0] * 16
    assert torch.equal(q[0::2], q[1::2])  # query i's positive and negative are rows 2i, 2i+1
    pos_rows = {tuple(r) for r in p[0::2].tolist()}
    assert all(tuple(r) not in {tuple(x)} for r, x in zip(p[1::2].tolist(), p[0::2].tolist()))
    assert len(pos_rows) == 16  # a step's queries are distinct (one epoch permutation)
    assert not torch.equal(d.train_batch(step=4, size=16, seed=5)[0], q)
    # steps 0..4 of size 8 cover one epoch of 40 pairs exactly once
    seen = torch.cat([d.train_batch(s, 8)[1][0::2] for s in range(5)])
    assert len({tuple(r) for r in seen.tolist()}) == 40


def test_eval_set_is_fixed():
    d = _data()
    q, p, y = d.eval_set(limit=10, seed=0)
    assert q.shape[0] == p.shape[0] == y.numel() == 10 * (1 + EVAL_NEGATIVES)
    assert y.sum() == 10 and torch.equal(p, d.eval_set(limit=10, seed=0)[1])
    group = p.view(10, 1 + EVAL_NEGATIVES, -1)
    assert torch.equal(group[:, 0], d.passages[:10])
    assert all(not torch.equal(group[i, 0], group[i, k]) for i in range(10) for k in range(1, 1 + EVAL_NEGATIVES))


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_pair_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    labels = (torch.rand(60, generator=g) < 0.3).float()
    labels[0], labels[1] = 1, 0
    assert auc(scores, labels) == pytest.approx(_brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_edges_and_errors():
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.9, 0.1]), torch.tensor([0.0, 1.0])) == 0.0
    assert auc(torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 1.0])) == 0.5
    with pytest.raises(ValueError, match="auc: needs positives and negatives, got 0 positive and 3 negative"):
        auc(torch.rand(3), torch.zeros(3))
    with pytest.raises(ValueError, match="auc: 3 scores for 2 labels"):
        auc(torch.rand(3), torch.zeros(2))


def _sweep(n=120, lo=1e-4, hi=1e-1):
    params = range_test_params(lo, hi, n)
    s = LRRangeTest(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lo), **params)
    return [s.lr_at(i)[0] for i in range(n)]


def test_range_test_params_sweep_linearly_from_min_to_max():
    lrs = _sweep(50, 1e-3, 1e-1)
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-1)
    assert lrs[1] - lrs[0] == pytest.approx(lrs[-1] - lrs[-2])
    with pytest.raises(ValueError, match="need 0 < min lr < max lr, got 0.1 and 0.01"):
        range_test_params(0.1, 0.01, 10)


def test_suggestion_finds_the_valley_and_divergence():
    lrs = _sweep()
    # loss falls with log lr until lr = 0.02, then blows up
    losses = [1.0 - 0.1 * math.log(lr / 1e-4) if lr <= 0.02 else 1.0 - 0.1 * math.log(200) + 30 * (lr - 0.02)
              for lr in lrs]
    s = suggest_one_cycle(lrs, losses, smoothing=0.0)
    valley = max(lr for lr in lrs if lr <= 0.02)
    assert s.lr_at_min_loss == pytest.approx(valley)
    assert s.cycle_max_lr == pytest.approx(0.5 * valley) and s.cycle_min_lr == pytest.approx(0.125 * valley)
    assert s.diverged_at_lr is not None and 0.02 < s.diverged_at_lr < 0.1
    assert s.lr_steepest < s.lr_at_min_loss
    cfg = s.scheduler(total_steps=100)
    assert cfg["type"] == "OneCycle" and cfg["params"]["cycle_max_lr"] == s.cycle_max_lr
    assert cfg["params"]["cycle_first_step_size"] == 45
    assert cfg["params"]["cycle_min_mom"] < cfg["params"]["cycle_max_mom"]


def test_suggestion_treats_nan_as_divergence_and_smooths_noise():
    lrs = _sweep()
    g = torch.Generator().manual_seed(0)
    losses = [(lr - 0.01) ** 2 * 10 + 0.3 + 0.05 * float(torch.randn(1, generator=g)) for lr in lrs]
    losses[100:] = [float("nan")] * 20
    s = suggest_one_cycle(lrs, losses)
    assert 0.003 < s.lr_at_min_loss < 0.03  # near the true minimum at 0.01 despite the noise
    assert s.diverged_at_lr == pytest.approx(lrs[100])


def test_suggestion_errors_say_what_to_change():
    lrs = _sweep(20)
    with pytest.raises(ValueError, match="the loss rose from the start; begin the sweep at a lower lr"):
        suggest_one_cycle(lrs, [1.0 * 3**i for i in range(20)], smoothing=0.0)
    with pytest.raises(ValueError, match="the smoothed loss never fell by 2 % .*the model did not train"):
        suggest_one_cycle(lrs, [0.6931 + 0.001 * (i % 2) for i in range(20)])
    with pytest.raises(ValueError, match="20 learning rates for 19 losses"):
        suggest_one_cycle(lrs, [1.0] * 19)
    with pytest.raises(ValueError, match="must be positive and non-decreasing"):
        suggest_one_cycle(list(reversed(lrs)), [1.0] * 20)
    with pytest.raises(ValueError, match="4 steps are too few"):
        suggest_one_cycle(lrs[:4], [1.0] * 4)


def test_lr_range_cli_reads_csv_monitor_files(tmp_path, capsys):
    from shardspeed.utils.lr_range import main

    lrs = _sweep(60)
    losses = [2.0 - 0.2 * math.log(lr / 1e-4) if lr < 0.03 else 50.0 for lr in lrs]
    for name, values in (("Train_Samples_lr", lrs), ("Train_Samples_train_loss", losses)):
        (tmp_path / f"{name}.csv").write_text("step,value\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values)))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "suggested OneCycle: cycle_min_lr" in out
    assert (tmp_path / "lr_range_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"cycle_max_lr"' in (tmp_path / "lr_range_test.json").read_text()
    assert main([str(tmp_path / "missing")]) == 2
    assert "Train_Samples_lr.csv" in capsys.readouterr().err
