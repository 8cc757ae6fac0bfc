"""Pipeline p2p (comm/p2p.py) on real ranks: structures of every kind reach the next stage intact,
shapes change per message, two ranks may send to each other in one tick, gradients come back for
exactly the leaves that needed them, receive buffers are reused once given back, and the comm
observers see every byte."""

import torch

from tests.distributed.harness import run_ranks


def _structures(step):
    """What rank 0 sends in round ``step``: shapes change every round."""
    n = step + 2
    g = torch.Generator().manual_seed(step)
    return [
        torch.randn(n, 3, generator=g),
        (torch.randn(n, generator=g, requires_grad=True), torch.arange(n), None),
        {"hidden": torch.randn(n, 4, generator=g, requires_grad=True),
         "mask": torch.rand(n, generator=g) > 0.5,
         "half": [torch.randn(2, n, generator=g).to(torch.bfloat16).requires_grad_()]},
        # a header longer than the fixed slot: long keys and many leaves
        {f"key_{'x' * 20}_{i}": torch.full((i + 1,), float(i)) for i in range(n + 3)},
    ]


def _chain(rank):
    from shardspeed import comm
    from shardspeed.comm.p2p import PipeComm, RecvObj, RecvTensors, SendObj, SendTensors, TensorSpec, leaves

    comm.init_distributed()
    stats = comm.CommStats()
    comm.add_observer(stats)
    pc = PipeComm(comm.world_group(), torch.device("cpu"))
    out = {"ok": [], "grads": [], "allocated": []}
    for step in range(3):
        for k, obj in enumerate(_structures(step)):
            tag = 10 * step + k
            if rank == 0:
                pc.exchange([SendObj(1, obj, tag)])
                wanted = [t for t in leaves(obj) if t.requires_grad]
                got = pc.exchange([RecvTensors(1, [TensorSpec(tuple(t.shape), t.dtype) for t in wanted], tag)])[0]
                out["grads"].append(all(torch.equal(g, 2 * t.detach()) for g, t in zip(got, wanted)))
                pc.release(got)
            elif rank == 1:
                # receive from 0 and forward to 2 in the next tick, as a middle stage would
                got = pc.exchange([RecvObj(0, tag)])[0]
                from tests.unit.test_p2p_layout import _same

                out["ok"].append(_same(got, obj) and
                                 [t.requires_grad for t in leaves(got)] ==
                                 [t.requires_grad and t.is_floating_point() for t in leaves(obj)])
                pc.exchange([SendObj(2, got, tag)])
                grads = [2 * t.detach() for t in leaves(got) if t.requires_grad]
                pc.exchange([SendTensors(0, grads, tag)])
                pc.release(got)
            else:
                got = pc.exchange([RecvObj(1, tag)])[0]
                from tests.unit.test_p2p_layout import _same

                out["ok"].append(_same(got, obj))
                pc.release(got)
    # one tick in which ranks 0 and 1 send to each other (interleaved schedules with 2 stages) and
    # rank 1 sends a gradient back at the same time
    if rank in (0, 1):
        peer = 1 - rank
        mine = {"from": torch.full((3,), float(rank)), "ids": torch.arange(rank + 1)}
        ops = [SendObj(peer, mine, 99), RecvObj(peer, 99)]
        grad_spec = [TensorSpec((2,), torch.float32)]
        ops += [SendTensors(0, [torch.ones(2)], 98)] if rank == 1 else [RecvTensors(1, grad_spec, 98)]
        res = pc.exchange(ops)
        out["ok"].append(torch.equal(res[1]["from"], torch.full((3,), float(peer))) and
                         torch.equal(res[1]["ids"], torch.arange(peer + 1)))
        if rank == 0:
            out["ok"].append(torch.equal(res[2][0], torch.ones(2)))
    # buffer reuse: a structure still held is never overwritten; one given back is reused
    same = lambda v: {"a": torch.full((4, 5), float(v)), "ids": torch.full((3,), v)}  # noqa: E731
    if rank == 0:
        for v in range(3):
            pc.exchange([SendObj(1, same(v), 200 + v)])
    elif rank == 1:
        hits = pc.predicted
        first = pc.exchange([RecvObj(0, 200)])[0]
        before = pc.pool.allocated
        second = pc.exchange([RecvObj(0, 201)])[0]
        grew = pc.pool.allocated - before
        intact = torch.equal(first["a"], same(0)["a"]) and torch.equal(second["a"], same(1)["a"])
        pc.release(first)
        pc.release(second)
        before = pc.pool.allocated
        third = pc.exchange([RecvObj(0, 202)])[0]
        out["reuse"] = (grew, pc.pool.allocated - before, intact, torch.equal(third["ids"], same(2)["ids"]))
        # three equal layouts after another one: the third is the first a receive was posted ahead for
        out["predicted"] = (hits, pc.predicted - hits)
    out["predicted_total"] = pc.predicted
    pc.flush()  # the last sends are in flight until the next exchange or a flush, as the engine does
    out["bytes"] = {op: s.bytes for op, s in stats.ops.items()}
    comm.remove_observer(stats)
    # ends that fell out of step (here: rank 1 forgets the link's layouts) raise instead of misreading data;
    # rank 0's predicted payload then has no receive, so it is not waited for
    if rank == 0:
        pc.exchange([SendObj(1, same(3), 203)])
    elif rank == 1:
        pc._recv_layout.clear()
        try:
            pc.exchange([RecvObj(0, 203)])
        except RuntimeError as e:
            out["out_of_step"] = str(e)
    comm.barrier()  # rank 0 stays until rank 1 has read the header
    return out


def test_structures_round_trip_over_three_ranks():
    results = run_ranks(_chain, 3)
    for rank, r in enumerate(results):
        assert r["ok"] and all(r["ok"]), (rank, r["ok"])
    assert len(results[0]["grads"]) == 12 and all(results[0]["grads"])
    assert results[1]["reuse"] == (2, 0, True, True)
    assert results[1]["out_of_step"].startswith("pipeline p2p: rank 0 and this rank disagree about the layout")
    # every structure of the chain has a new layout: none predicted (Note: predicted layouts in p2p.py)
    assert results[1]["predicted"] == (0, 1) and results[2]["predicted_total"] == 0
    # every byte is reported: rank 1 received what rank 0 sent plus rank 2's nothing, and the
    # headers; rank 2 received what rank 1 sent it
    from shardspeed.comm.p2p import leaves

    b0, b1, b2 = (r["bytes"] for r in results)
    payload = sum(t.numel() * t.element_size() for s in range(3) for obj in _structures(s) for t in leaves(obj))
    headers = 12 * 64 * 8  # at least one header slot per structure
    assert b2["recv"] >= payload + headers and b2.get("send", 0) == 0
    # what rank 1 forwarded to rank 2 is what rank 2 received; rank 0's sends are rank 1's receives
    # (the mutual tick and the reuse checks are between ranks 0 and 1 only)
    assert b1["send"] - b2["recv"] == b0["recv"], (b0, b1, b2)
    assert b0["send"] == b1["recv"], (b0, b1, b2)


def _ahead(rank):
    from shardspeed import comm
    from shardspeed.comm.p2p import PipeComm, RecvObj, SendObj

    comm.init_distributed()
    pc = PipeComm(comm.world_group(), torch.device("cpu"))
    out = {}
    act = lambda v, n=4: (torch.full((n, 3), float(v)), torch.arange(n))  # noqa: E731
    # rank 0 sends six structures; the shape changes at the fourth. Rank 1 posts each receive ahead,
    # right after the previous exchange, and forwards each structure to rank 2 before giving it back
    shapes = [4, 4, 4, 6, 6, 6]
    if rank == 0:
        for tag, n in enumerate(shapes):
            pc.exchange([SendObj(1, act(tag, n), tag)])
    elif rank == 1:
        got, reused = [], []
        x = pc.exchange([RecvObj(0, 0)])[0]
        for tag in range(1, len(shapes) + 1):
            got.append(torch.equal(x[0], act(tag - 1, shapes[tag - 1])[0]))
            pc.exchange([SendObj(2, x, tag - 1)])  # in flight until the next exchange, reading x's buffers
            pc.release(x)  # given back while the send still reads it (an inference stage does this)
            if tag == len(shapes):
                break
            pc.post_ahead(RecvObj(0, tag))
            predicted = pc._ahead[0].guessed
            reused.append(predicted is not None and predicted[1][0].data_ptr() == x[0].data_ptr())
            x = pc.exchange([RecvObj(0, tag)])[0]
        out["got"] = got
        out["buffer_of_an_inflight_send_taken"] = any(reused)
        out["predicted"] = pc.predicted
        out["pending"] = pc.pending_ahead()
        # misuse: a second receive ahead on the same link, and an exchange asking another tag first
        pc.post_ahead(RecvObj(0, 50))
        try:
            pc.post_ahead(RecvObj(0, 51))
        except RuntimeError as e:
            out["twice"] = str(e)
        try:
            pc.exchange([RecvObj(0, 49)])
        except RuntimeError as e:
            out["other_tag"] = str(e)
        # a batch that stops with a receive posted ahead leaves the link unusable, and says so
        pc.post_ahead(RecvObj(0, 60))
        pc.abandon_ahead("a batch failed on pipeline stage 1")
        for call in (lambda: pc.exchange([RecvObj(0, 60)]), lambda: pc.post_ahead(RecvObj(0, 61))):
            try:
                call()
            except RuntimeError as e:
                out.setdefault("abandoned", []).append(str(e))
    else:
        out["forwarded"] = [torch.equal(pc.exchange([RecvObj(1, t)])[0][0], act(t, n)[0]) for t, n in enumerate(shapes)]
    pc.flush()
    comm.barrier()
    return out


def test_receives_posted_ahead_get_their_structures_and_never_a_buffer_a_send_still_reads():
    # comm/p2p.py, Note: receives posted ahead
    results = run_ranks(_ahead, 3)
    r1 = results[1]
    assert r1["got"] == [True] * 6 and results[2]["forwarded"] == [True] * 6
    assert not r1["buffer_of_an_inflight_send_taken"]
    # predicted: the third (two equal layouts before it) and the sixth; the fourth changed shape (fillers)
    assert r1["predicted"] == 2
    assert r1["pending"] == []
    assert r1["twice"] == ("pipeline p2p: a receive from rank 0 is already posted ahead (tag 50); only the next "
                           "structure on a link can be")
    assert r1["other_tag"] == ("pipeline p2p: the receive from rank 0 posted ahead was for tag 50, and this exchange "
                               "receives tag 49 from it first")
    assert r1["abandoned"] == 2 * [
        "pipeline p2p: a batch failed on pipeline stage 1, leaving receives posted ahead from ranks [0]; they may "
        "still take this link's next messages, so it cannot be used again: restart the pipeline's ranks together"]
