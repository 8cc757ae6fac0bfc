"""What NCCL needs from the pipeline's point-to-point messages, checked on gloo runs.

NCCL matches a send with a receive by posting order alone (no tags), and a ``dist.isend``/``irecv``
posted alone blocks its stream until the other end's matching call runs, with one stream per pair of
ranks. So on every pair of ranks the two ends must post the *same sequence* of calls, one's sends
where the other has its receives, in the same order and with the same sizes and dtypes; otherwise
data lands in the wrong buffer or both ends wait on a send (comm/p2p.py, Note: one tick, two phases;
pipe/schedule.py, Note: early gradient sends). Gloo, which these tests run on, matches by tag and
would hide both, so every rank records what ``PipeComm`` posts and the test compares the ends of every
pair: ticks with headers, predicted payloads, fillers when a layout changes, header overflow, a
tensor message the other way in the same tick, two ranks sending each other structures in one tick;
and the engine's 1F1B with the cool-down's early gradient sends, GPipe and ``eval_batch`` at P = 2,
and 1F1B at P = 4.
"""

import torch

from tests.distributed import pipe_workloads as pw
from tests.distributed.harness import run_ranks


def _record() -> list[tuple[str, int, int, int, str]]:
    """Log every isend/irecv PipeComm posts in this process: (op, peer, kind, numel, dtype)."""
    from shardspeed.comm import p2p

    log: list[tuple[str, int, int, int, str]] = []

    def wrap(post, op):
        def posted(self, t, peer, tag, kind):
            log.append((op, peer, kind, t.numel(), str(t.dtype)))
            return post(self, t, peer, tag, kind)
        return posted

    p2p.PipeComm._isend = wrap(p2p.PipeComm._isend, "send")
    p2p.PipeComm._irecv = wrap(p2p.PipeComm._irecv, "recv")
    return log


def _pairs_post_the_same_sequence(logs: list[list[tuple]], links: list[tuple[int, int]],
                                  one_sequence: bool = True) -> list[str]:
    """For each link (a, b): a's calls towards b, with send and receive swapped, equal b's towards a
    (``one_sequence``: both directions as one sequence, what ungrouped NCCL calls on one stream need;
    else each direction alone, what matching needs). The mismatches, described."""
    swap = {"send": "recv", "recv": "send"}
    problems = []
    for a, b in links:
        for direction in ([None] if one_sequence else ["send", "recv"]):
            mine = [(op, *rest) for op, peer, *rest in logs[a] if peer == b and direction in (None, op)]
            theirs = [(swap[op], *rest) for op, peer, *rest in logs[b] if peer == a and direction in (None, swap[op])]
            if mine != theirs:
                at = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
                problems.append(f"ranks {a}-{b}: {len(mine)} vs {len(theirs)} calls, first difference at {at}: "
                                f"{mine[at:at + 3]} vs {theirs[at:at + 3]} (rank {b}'s swapped)")
            if not mine:
                problems.append(f"ranks {a}-{b}: nothing recorded")  # the test must see traffic to mean anything
    return problems


def _structure(n: int, many: bool = False):
    """A stage output: (hidden, mask); ``many``: a dict whose header overflows the fixed slot."""
    g = torch.Generator().manual_seed(n)
    if many:
        return {f"field_{'y' * 12}_{i}": torch.randn(n, 3, generator=g, requires_grad=True) for i in range(8)}
    return torch.randn(n, 4, generator=g, requires_grad=True), torch.arange(n) % 2 == 0


def _ticks(rank):
    from shardspeed import comm
    from shardspeed.comm.p2p import PipeComm, RecvObj, RecvTensors, SendObj, SendTensors, TensorSpec, leaves

    comm.init_distributed()
    log = _record()
    pc = PipeComm(comm.world_group(), torch.device("cpu"))
    # 1F1B's steady state on two stages: rank 0 sends micro-batch k's output and receives the
    # gradient of k - 1, rank 1 the other way round. Layouts: equal three times (predicted from the
    # third), a changed shape (fillers), an overflowing header, equal again (predicted with
    # overflow), then changed (fillers and overflow)
    plan = [(3, False)] * 4 + [(5, False), (5, True), (5, True), (5, True), (6, True), (3, False)]
    sent = {}
    for k, (n, many) in enumerate(plan):
        if rank == 0:
            sent[k] = _structure(n, many)
            ops = [SendObj(1, sent[k], k)]
            if k:
                ops.append(RecvTensors(1, [TensorSpec(tuple(t.shape), t.dtype) for t in leaves(sent[k - 1])
                                           if t.requires_grad], k - 1))
            res = pc.exchange(ops)
            if k:
                pc.release(res[1])
        else:
            grads = [torch.ones_like(t) for t in leaves(sent[k - 1]) if t.requires_grad] if k else []
            ops = [SendTensors(0, grads, k - 1)] if k else []
            got = pc.exchange([*ops, RecvObj(0, k)])[-1]
            sent[k] = got
            if k:
                pc.release(sent.pop(k - 1))
    steady = list(log)
    # two ranks sending each other a structure in one tick (interleaved 1F1B on two stages, which the
    # engine does not run), with a gradient rank 1 -> 0 beside them; equal layouts (the third
    # predicted), then an overflowing one. Each direction matches; the two directions cross, which
    # NCCL could only run grouped (comm/p2p.py, Note: one tick, two phases)
    del log[:]
    for k in range(4):
        mine = _structure(4 + rank, many=k == 3)
        ops = [SendObj(1 - rank, mine, 50 + k), RecvObj(1 - rank, 50 + k)]
        grad = TensorSpec((2,), torch.float32)
        ops += [SendTensors(0, [torch.ones(2)], 60 + k)] if rank == 1 else [RecvTensors(1, [grad], 60 + k)]
        pc.exchange(ops)
    pc.flush()
    comm.barrier()
    return steady, list(log), pc.predicted


def test_two_ranks_post_their_messages_in_the_same_order():
    results = run_ranks(_ticks, 2)
    steady, crossed = [r[0] for r in results], [r[1] for r in results]
    for logs in (steady, crossed):  # what the scenarios are meant to exercise: overflow, fillers, predictions
        assert {kind for _, _, kind, _, _ in logs[0]} == {0, 1, 2, 3, 4}, logs[0]
    assert results[1][2] >= 4  # structures received into predicted buffers
    assert _pairs_post_the_same_sequence(steady, [(0, 1)]) == []
    assert _pairs_post_the_same_sequence(crossed, [(0, 1)], one_sequence=False) == []


def _engine_runs(rank, stages):
    import shardspeed
    from shardspeed import comm
    from shardspeed.pipe import PipelineModule

    comm.init_distributed()
    log = _record()
    for schedule in ("1f1b", "gpipe"):
        module = PipelineModule(pw.layers(blocks=2 * stages - 1), num_stages=stages, loss_fn=pw.loss_fn,
                                partition_method="uniform")
        engine, *_ = shardspeed.initialize(model=module, config={
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 6,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "pipeline": {"schedule": schedule}})
        for step in range(2):
            engine.train_batch(iter(pw.micro_batches(step, 0, 1, 2, 6)))
            if step == 0:
                engine.eval_batch(iter(pw.micro_batches(9, 0, 1, 2, 6)))
    comm.barrier()
    return log


def test_the_pipeline_engine_posts_the_same_sequence_at_both_ends_of_every_link():
    logs = run_ranks(_engine_runs, 2, 2)
    assert _pairs_post_the_same_sequence(logs, [(0, 1)]) == []


def test_four_stages_post_the_same_sequence_at_both_ends_of_every_link():
    logs = run_ranks(_engine_runs, 4, 4)
    assert _pairs_post_the_same_sequence(logs, [(0, 1), (1, 2), (2, 3)]) == []
    assert not any(peer - rank not in (-1, 1) for rank, log in enumerate(logs) for _, peer, *_ in log)
