"""partition_activations: each model-parallel rank keeps 1/mp of a checkpoint's inputs, all-gathered in
backward; results equal keeping everything. contiguous_checkpointing reuses its buffers."""

import torch

from tests.distributed.harness import run_ranks


def _worker(rank, contiguous):
    import shardspeed
    from shardspeed import checkpointing
    from tests.distributed.workloads import SplitMPU, tiny_gpt

    shardspeed.init_distributed()
    model = tiny_gpt(dropout=0.2)
    model.train()

    def run(recompute, step):
        torch.manual_seed(100 + step)  # the same data and dropout on both ranks, as tensor slicing has
        x = torch.randint(0, model.c.vocab, (2, 16))
        h = model.tok(x) + model.pos(torch.arange(16))
        for blk in model.blocks:
            h = checkpointing.checkpoint(blk, h) if recompute else blk(h)
        loss = h.float().pow(2).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = [run(False, s) for s in range(2)]
    checkpointing.configure(SplitMPU(), partition_activations=True, contiguous_checkpointing=contiguous,
                            num_checkpoints=len(model.blocks) if contiguous else None)
    kept = []
    orig = checkpointing._Kept.__init__

    def spy(self, t, s, slot):
        orig(self, t, s, slot)
        kept.append((t.numel(), self.data.numel(), self.data.data_ptr()))

    checkpointing._Kept.__init__ = spy
    got = [run(True, s) for s in range(2)]
    checkpointing._Kept.__init__ = orig
    checkpointing.reset()
    return {"ref": ref, "got": got, "kept": kept}


def _check(r):
    for (l0, g0), (l1, g1) in zip(r["ref"], r["got"]):
        assert abs(l0 - l1) <= 1e-6 * abs(l0)
        for n in g0:
            assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7), n


def test_partitioned_inputs_give_the_same_gradients():
    for r in run_ranks(_worker, 2, False):
        _check(r)
        full, piece, _ = r["kept"][0]
        assert piece == -(-full // 2)  # half of each kept input per rank


def test_contiguous_buffers_are_reused_across_steps():
    r0, _ = run_ranks(_worker, 2, True)
    _check(r0)
    ptrs = [p for _, _, p in r0["kept"]]
    layers = len(ptrs) // 2
    assert ptrs[:layers] == ptrs[layers:]  # step 2 stores into step 1's buffers
