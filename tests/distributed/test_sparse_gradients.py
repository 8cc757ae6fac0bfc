"""sparse_gradients: embedding gradients reduced as index slices (zero/sparse.py) on 2 real ranks,
against single-process PyTorch on the same global batches."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.sparse_workloads import (
    EDGE_UNUSED_STEP,
    EMPTY_STEP,
    BagModel,
    TextModel,
    edge_reference,
    edge_run,
    hf_bert_run,
    integer_run,
    max_rel,
    model_rel,
    protocol_run,
    protocol_slices,
    publish_rows_with_a_poisoned_copy,
    reference_run,
    rscan_reference,
    rscan_run,
    runs_in_one_job,
    small_table_reference,
    small_table_run,
    sparse_engine_run,
)

WORLD, MICRO = 2, 3
ADAMW = {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}


def _config(stage, gas=1, optimizer=ADAMW, **extra):
    return {"train_batch_size": WORLD * MICRO * gas, "train_micro_batch_size_per_gpu": MICRO,
            "optimizer": optimizer, "steps_per_print": None, "sparse_gradients": True,
            "comms_logger": {"enabled": True},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 500}, **extra}


def _adamw(model):
    return [torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_dense_table_equals_single_process_adamw(stage):
    """(a) 20 steps, rank 1 touches no row at one step: the flag changes communication only."""
    steps = 20
    ranks = run_ranks(sparse_engine_run, WORLD, _config(stage), steps)
    ref = reference_run(steps, WORLD, MICRO, _adamw)
    for r in ranks:
        assert max_rel(r["params"], ref) < 1e-5
        assert r["dense_fallbacks"] == 0
    # the table travelled as slices, the rest densely: per step far fewer bytes than the table's 32 KB
    comm = ranks[0]["comm"]
    assert all(c["sparse_all_gather"] < 1000 * 8 * 4 / 4 for c in comm)
    dense_op = "all_reduce" if stage == 0 else "reduce_scatter"
    assert all(c[dense_op] < 1000 * 8 * 4 / 4 for c in comm)
    assert comm[EMPTY_STEP]["sparse_all_gather"] > 0  # rank 0 still sent rows rank 1 had none of
    assert all(c["sparse_bytes"] == c["sparse_all_gather"] + c.get("sparse_sizes", 0) for c in comm)
    # one collective per step for the table (zero/sparse.py, Note: one gather per step): the counts travel
    # with the rows, exchanged apart only at the first step
    assert comm[0]["sparse_sizes calls"] == 1 and all("sparse_sizes" not in c for c in comm[1:])
    assert sum(c["sparse_all_gather calls"] for c in comm) == steps + ranks[0]["regathers"]


def _sparse_adam_and_adam(model):
    rest = [p for n, p in model.named_parameters() if n != "emb.weight"]
    return [torch.optim.SparseAdam([model.emb.weight], lr=1e-2), torch.optim.Adam(rest, lr=1e-2)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_sparse_table_config_adam_equals_sparse_adam_plus_adam(stage):
    """(b) a sparse=True table is updated lazily: rows no rank looked up keep their values and moments."""
    steps = 20
    adam = {"type": "Adam", "params": {"lr": 1e-2}}
    ranks = run_ranks(sparse_engine_run, WORLD, _config(stage, optimizer=adam), steps, {"sparse": True})
    ref = reference_run(steps, WORLD, MICRO, _sparse_adam_and_adam, {"sparse": True})
    dense_adam = reference_run(steps, WORLD, MICRO, lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2)])
    for r in ranks:
        assert max_rel(r["params"], ref) < 1e-5
    # lazy, not dense Adam: rows touched early keep moving under dense Adam only
    assert float((ranks[0]["params"]["emb.weight"] - dense_adam["emb.weight"]).abs().max()) > 1e-3
    comm = ranks[0]["comm"]
    assert comm[0]["sparse_all_gather"] > 0
    if stage > 0:  # the lazy update's rows are published, not the whole 32 KB table gathered
        assert all(c["all_gather"] < 1000 * 8 * 4 / 4 and 0 < c["sparse_param_rows"] < 1000 * 8 * 4 / 4
                   for c in comm)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_integer_gradients_sparse_and_dense_reductions_are_bitwise_equal(stage):
    """(c) EmbeddingBag with empty bags; SGD with lr 1 applies the averaged gradient itself."""
    steps = 6
    sgd = {"type": "SGD", "params": {"lr": 1.0}}
    cfg = {**_config(stage, optimizer=sgd), "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}
    runs = [(integer_run, ({**cfg, "sparse_gradients": False}, steps, False)), (integer_run, (cfg, steps, False)),
            (integer_run, (cfg, steps, True))]
    for dense, as_slices, sparse_table in run_ranks(runs_in_one_job, WORLD, runs):
        assert torch.equal(dense["emb.weight"], as_slices["emb.weight"])
        assert torch.equal(dense["emb.weight"], sparse_table["emb.weight"])
        assert not torch.equal(dense["emb.weight"], BagModel().emb.weight.detach())  # it trained


def test_dense_fallback_when_slices_are_larger_than_the_table():
    """A 30-row table: a step touching more than 12 rows on some rank would gather more than the table
    (2 ranks x rows x (32 + 8 index) bytes > 30 x 32), so that step reduces densely; the others not."""
    steps = 6
    ranks = run_ranks(sparse_engine_run, WORLD, _config(1), steps, {"vocab": 30})
    ref = reference_run(steps, WORLD, MICRO, _adamw, {"vocab": 30})
    for r in ranks:
        assert max_rel(r["params"], ref) < 1e-5
    comm = ranks[0]["comm"]
    # a dense step all-reduces the table's 960 bytes on top of the other parameters' reduce-scatter
    dense_steps = [c for c in comm if c.get("all_reduce", 0) >= 30 * 8 * 4]
    assert 0 < ranks[0]["dense_fallbacks"] == len(dense_steps) < steps
    # a gather that turned out too large is never larger than the table and each rank's 8-byte count
    # (Note: fallback)
    assert all(c.get("sparse_all_gather", 0) <= 30 * 8 * 4 + 8 * WORLD for c in comm)


def test_one_gather_per_step_regathers_when_a_count_outgrows_the_capacity():
    """The reducer alone through PROTOCOL_COUNTS (integer values: any order sums exactly): every step
    equals the sum of both ranks' slices / 2; after the first, one gather a step, two where a count
    outgrew the capacity the previous step set; a step where no rank's table got a gradient gives None."""
    ranks = run_ranks(protocol_run, WORLD)
    for a, b in zip(*ranks, strict=True):  # every rank the same result
        assert (a["rows"] is None) == (b["rows"] is None)
        assert a["rows"] is None or (torch.equal(a["rows"], b["rows"]) and torch.equal(a["values"], b["values"]))
    for step, got in enumerate(ranks[0]):
        parts = [protocol_slices(step, r) for r in range(WORLD)]
        if not any(used for _, _, used in parts):
            assert got["rows"] is None and got["calls"] == {"sparse_all_gather": 1}
            continue
        want = torch.zeros(1000, 3)
        touched = torch.zeros(1000, dtype=torch.bool)
        for rows, values, _ in parts:
            want.index_add_(0, rows, values)
            touched[rows] = True
        assert torch.equal(got["rows"], touched.nonzero().view(-1))
        assert torch.equal(got["values"], want[touched] / WORLD)
        expect = {0: {"sparse_sizes": 1, "sparse_all_gather": 1}, 2: {"sparse_all_gather": 2}}
        assert got["calls"] == expect.get(step, {"sparse_all_gather": 1}), step
    assert [s["regathers"] for s in ranks[0]] == [0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(("stage", "sparse"), [(0, True), (1, False), (2, True), (2, False)])
def test_accumulation_and_clipping(stage, sparse):
    steps, gas, clip = 8, 2, 0.05
    opt = {"type": "Adam", "params": {"lr": 1e-2}}
    ranks = run_ranks(sparse_engine_run, WORLD, _config(stage, gas=gas, optimizer=opt, gradient_clipping=clip),
                      steps, {"sparse": sparse})
    make = _sparse_adam_and_adam if sparse else (lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2)])
    ref = reference_run(steps, WORLD, MICRO * gas, make, {"sparse": sparse}, clip=clip)
    unclipped = reference_run(steps, WORLD, MICRO * gas, make, {"sparse": sparse})
    for r in ranks:
        assert max_rel(r["params"], ref) < 1e-5
        assert max_rel(r["params"], unclipped) > 1e-4  # clipping was active
        assert r["grad_norm"] > clip


@pytest.mark.parametrize("sparse", [False, True])
def test_bf16_and_fp16_track_fp32(sparse):
    steps = 6
    opt = {"type": "Adam", "params": {"lr": 1e-2}}
    extras = ({}, {"bf16": {"enabled": True}}, {"fp16": {"enabled": True, "initial_scale_power": 8}})
    runs = [(sparse_engine_run, (_config(1, optimizer=opt, **extra), steps, {"sparse": sparse})) for extra in extras]
    (fp32, *low0), (_, *low1) = run_ranks(runs_in_one_job, WORLD, runs)
    for a, b in zip(low0, low1):
        assert a["skipped"] == 0
        assert model_rel(a["params"], fp32["params"]) < 1e-2
        assert max_rel(a["params"], b["params"]) == 0.0


@pytest.mark.parametrize(("stage", "sparse"), [(1, True), (2, False)])
def test_fp16_overflow_in_a_table_gradient_skips_the_step_on_every_rank(stage, sparse):
    steps, bad = 5, 2
    opt = {"type": "Adam", "params": {"lr": 1e-2}}
    cfg = _config(stage, optimizer=opt, fp16={"enabled": True, "initial_scale_power": 8})
    ranks = run_ranks(sparse_engine_run, WORLD, cfg, steps, {"sparse": sparse}, None, None, None, bad)
    make = _sparse_adam_and_adam if sparse else (lambda m: [torch.optim.Adam(m.parameters(), lr=1e-2)])
    ref = reference_run(steps, WORLD, MICRO, make, {"sparse": sparse}, skip=bad)
    for r in ranks:
        assert r["skipped"] == 1
        assert model_rel(r["params"], ref) < 1e-2
    assert max_rel(ranks[0]["params"], ranks[1]["params"]) == 0.0


def test_checkpoint_resume_and_zero_to_fp32(tmp_path):
    """A sparse=True table's lazy Adam state is saved by pieces like any parameter's: resuming at
    stage 2 or at stage 0 continues exactly, and zero_to_fp32 gives the parameters at the save."""
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    steps, adam = 6, {"type": "Adam", "params": {"lr": 1e-2}}
    kw = {"sparse": True}
    ckpt = str(tmp_path)
    runs = [(sparse_engine_run, (_config(2, optimizer=adam), steps, kw, None, ckpt))]
    runs += [(sparse_engine_run, (_config(stage, optimizer=adam), steps, kw, None, None, ckpt)) for stage in (2, 0)]
    full, *resumed = run_ranks(runs_in_one_job, WORLD, runs)[0]
    for r in resumed:
        assert max_rel(r["params"], full["params"]) < 1e-6
    at_save = reference_run(steps // 2, WORLD, MICRO, _sparse_adam_and_adam, kw)
    assert max_rel(get_fp32_state_dict_from_zero_checkpoint(str(tmp_path)), at_save) < 1e-5


def test_hugging_face_bert_stage1_flag_changes_communication_only():
    steps = 4
    cfg = {**_config(1, optimizer={"type": "Adam", "params": {"lr": 1e-3}}), "train_batch_size": 4,
           "train_micro_batch_size_per_gpu": 2}
    runs = [(hf_bert_run, ({**cfg, "sparse_gradients": False}, steps)), (hf_bert_run, (cfg, steps))]
    dense, sparse = run_ranks(runs_in_one_job, WORLD, runs)[0]
    assert max_rel(sparse["params"], dense["params"]) < 1e-5
    assert all(b > 0 for b in sparse["sparse_bytes"]) and all(b == 0 for b in dense["sparse_bytes"])


def test_sgd_momentum_on_a_sparse_table_at_stage2_gathers_the_whole_table():
    """Momentum moves rows looked up before, not only this step's: the rows-only publication would
    miss them, so the table is all-gathered whole (zero/sharded.py, _moves_touched_rows_only)."""
    steps, sgd = 6, {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    ranks = run_ranks(sparse_engine_run, WORLD, _config(2, optimizer=sgd), steps, {"sparse": True})
    ref = reference_run(steps, WORLD, MICRO, lambda m: [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)],
                        {"sparse": True})
    for r in ranks:
        assert max_rel(r["params"], ref) < 1e-5
    assert all("sparse_param_rows" not in c and c["all_gather"] >= 1000 * 8 * 4 for c in ranks[0]["comm"])


def test_padding_idx_per_sample_weights_and_tables_some_micro_batches_skip():
    """EmbeddingBag with per_sample_weights and a padding row, and a second table (padding row too)
    that only some micro-batches look up and no rank at all at EDGE_UNUSED_STEP: on a single process
    that table's .grad is None there, so SparseAdam does not count the step (its bias correction
    would differ by ~5e-4 relative otherwise; zero/sparse.py, Note: an unused table has no gradient).
    Dense tables with the flag equal plain Adam; sparse=True ones SparseAdam + Adam, at stages 0 and 2,
    with accumulation and clipping."""
    steps, micro, gas, clip, lr = 5, 2, 2, 0.3, 1e-2
    assert EDGE_UNUSED_STEP < steps
    cfg = {**_config(0, gas=gas, optimizer={"type": "Adam", "params": {"lr": lr}}, gradient_clipping=clip),
           "train_batch_size": WORLD * micro * gas, "train_micro_batch_size_per_gpu": micro}
    cases = [(sparse, stage) for sparse in (True, False) for stage in (0, 2)]
    runs = [(edge_run, ({**cfg, "zero_optimization": {"stage": stage, "reduce_bucket_size": 50}}, steps, sparse))
            for sparse, stage in cases]
    ranks = run_ranks(runs_in_one_job, WORLD, runs)
    refs = {sparse: edge_reference(steps, WORLD, micro, gas, sparse, clip, lr) for sparse in (True, False)}
    for i, (sparse, stage) in enumerate(cases):
        for r in ranks:
            assert max_rel(r[i], refs[sparse]) < 1e-5, (sparse, stage)


def test_sparse_table_dense_fallback_while_a_rank_looked_up_no_row():
    """A sparse=True 30-row table: at step 1 rank 0 looks up every row (the padded gather would be
    larger than the table, so the step falls back to the dense all-reduce) while rank 1 looks up none
    (its slices are [0, 8]): the lazy update still equals SparseAdam's, at stages 0 and 2."""
    steps, lr = 3, 1e-2
    cfg = {**_config(0, optimizer={"type": "Adam", "params": {"lr": lr}}), "train_batch_size": WORLD,
           "train_micro_batch_size_per_gpu": 1}
    runs = [(small_table_run, ({**cfg, "zero_optimization": {"stage": stage}}, steps)) for stage in (0, 2)]
    ranks = run_ranks(runs_in_one_job, WORLD, runs)
    ref = small_table_reference(steps, WORLD, lr)
    for r in ranks:
        for run in r:
            assert run["dense_fallbacks"] == 1
            assert max_rel(run["params"], ref) < 1e-5


def test_publishing_rows_ignores_a_non_owners_copy():
    adam = {"type": "Adam", "params": {"lr": 1e-2}}
    row0 = run_ranks(publish_rows_with_a_poisoned_copy, WORLD, _config(2, optimizer=adam))
    initial = TextModel(sparse=True).emb.weight.detach()[0]
    for r in row0:
        assert torch.equal(r, initial)


def _rscan_cases(world, stages):
    """(a) dense table + flag with AdamW, (b) sparse=True table with the config's Adam, per stage."""
    cfg = {"train_batch_size": world * MICRO, "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": None,
           "sparse_gradients": True}
    cases = [(sparse, stage) for stage in stages for sparse in (False, True)]
    runs = [(rscan_run, ({**cfg, "optimizer": ADAMW if not sparse else {"type": "Adam", "params": {"lr": 1e-2}},
                          "zero_optimization": {"stage": stage, "reduce_bucket_size": 500}}, 20, sparse))
            for sparse, stage in cases]
    return cases, runs


@pytest.mark.parametrize("world", [2, 3])
def test_rscan_model_equals_single_process(world):
    """The example's model (examples/rscan: bidirectional GRUs, padding_idx 0, one table shared by
    both encoders), tiny, 20 steps, rank 1's batch all padding at EMPTY_STEP: (a) a dense table
    with the flag equals single-process AdamW and (b) a sparse=True table with the config's Adam
    equals SparseAdam on the table + Adam elsewhere, at stages 0, 1, 2 on 2 ranks (stage 2 on 3)."""
    cases, runs = _rscan_cases(world, (0, 1, 2) if world == 2 else (2,))
    ranks = run_ranks(runs_in_one_job, world, runs)
    refs = {sparse: rscan_reference(20, world, MICRO, sparse, 1e-2, 0.01) for sparse in (False, True)}
    for i, (sparse, stage) in enumerate(cases):
        for r in ranks:
            assert max_rel(r[i], refs[sparse]) < 1e-5, (sparse, stage)
