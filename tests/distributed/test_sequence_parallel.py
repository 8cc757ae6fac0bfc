"""Sequence parallelism with the engine: a block whose LayerNorm/residual region is cut along the
sequence (embedding reduce-scattered, column layers all-gathering, row layers reduce-scattering, the
LayerNorms' and row bias's gradients summed over the tensor-parallel group by the layers) trained at
T=2 x D=2 with ZeRO 0-3, accumulation 2 and clipping that bites, equals one process (the layers at
T=1 are the torch ops: tests/unit/test_tensor_parallel.py) to 1e-5, and the clipping norms agree."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import max_rel_diff

V, S, H, GB, STEPS, CLIP = 32, 8, 16, 8, 4, 0.05


class SPNet(nn.Module):
    def __init__(self):
        super().__init__()
        from shardspeed import tensor_parallel as tp

        torch.manual_seed(3)
        self.emb = tp.VocabParallelEmbedding(V, H, sequence_parallel=True, sequence_dim=1)
        self.ln = tp.SequenceParallelLayerNorm(H)
        self.fc = tp.ColumnParallelLinear(H, 4 * H, gather_output=False, sequence_parallel=True, sequence_dim=1)
        self.out = tp.RowParallelLinear(4 * H, H, input_is_parallel=True, sequence_parallel=True, sequence_dim=1)
        self.lnf = tp.SequenceParallelLayerNorm(H)
        self.head = tp.ColumnParallelLinear(H, V, bias=False, gather_output=False, sequence_parallel=True,
                                           sequence_dim=1)

    def forward(self, ids, y):
        from shardspeed import tensor_parallel as tp

        x = self.emb(ids)
        x = x + self.out(F.gelu(self.fc(self.ln(x))))
        return tp.vocab_parallel_cross_entropy(self.head(self.lnf(x)).float(), y, reduction="mean")


def _batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, V, (GB, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _config(stage):
    return {"train_batch_size": GB, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "steps_per_print": None, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def _worker(rank):
    import shardspeed
    from shardspeed.comm import all_gather_object
    from shardspeed.tensor_parallel import join_slices, slice_spec

    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=2)
    dp_rank, out = unit.get_data_parallel_rank(), {}
    for stage in range(4):
        engine, *_ = shardspeed.initialize(model=SPNet(), config=_config(stage), mpu=unit)
        norms = []
        for step in range(STEPS):
            x, y = _batch(step)
            for m in range(2):
                lo = (dp_rank * 2 + m) * 2
                engine.backward(engine(x[lo:lo + 2], y[lo:lo + 2]))
                engine.step()
            norms.append(engine.get_global_grad_norm())
        specs = {n: slice_spec(p) for n, p in engine.module.named_parameters()}
        local = {n: v.detach().float().clone() for n, v in engine.module.state_dict().items() if n in specs}
        slices = all_gather_object(local, group=unit.get_tensor_model_parallel_group())
        out[stage] = ({n: join_slices([s[n] for s in slices], specs[n]) if specs[n] else local[n] for n in local},
                      norms)
    return out


def test_sequence_parallel_block_with_zero_equals_one_process():
    results = run_ranks(_worker, 4, timeout=600)
    model = SPNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ref_norms = []
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad()
        model(x, y).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
    ref = {n: p.detach() for n, p in model.named_parameters()}
    assert min(ref_norms) > CLIP  # the clipping bites every step
    for rank, r in enumerate(results):
        for stage, (params, norms) in r.items():
            assert max_rel_diff(params, ref) < 1e-5, (rank, stage, max_rel_diff(params, ref))
            assert norms == pytest.approx(ref_norms, rel=1e-5), (rank, stage)
