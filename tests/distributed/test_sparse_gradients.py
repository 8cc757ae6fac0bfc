"""sparse_gradients: embedding gradients reduced as index slices (zero/sparse.py) on 2 real ranks,
against single-process PyTorch on the same global batches."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.sparse_workloads import EMPTY_STEP, max_rel, reference_run, sparse_engine_run

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
