"""The tensor-parallel GPT of examples/megatron_gpt trained with ZeRO over the data-parallel group
equals single-process PyTorch on the same, unsliced model (issue 13's parity): T=2 x D=2 and T=4 x
D=1, ZeRO stages 0-3, AdamW, accumulation 2, clipping that bites."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import max_rel_diff

STEPS, MICRO, GAS, SEED = 10, 2, 2, 7
CFG = {"vocab": 64, "seq": 16, "layers": 2, "hidden": 32, "heads": 4}


def _config(stage, dp):
    return {"train_batch_size": MICRO * GAS * dp, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GAS, "steps_per_print": None, "gradient_clipping": 0.05,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            # persistence 0: stage 3 releases every parameter, the tied head's table too, as it does
            # for any table above the default threshold (1e5 elements)
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 2000,
                                  "stage3_param_persistence_threshold": 0}}


def _batches(step, dp):
    from examples.gpt_model import synthetic_batch

    return synthetic_batch(step, MICRO * GAS * dp, CFG["seq"], CFG["vocab"])


def full_params(engine, unit):
    """Every parameter unsliced: the tensor-parallel slices gathered (and joined) from the group."""
    from shardspeed.comm import all_gather_object
    from shardspeed.tensor_parallel import join_slices, slice_spec

    specs = {n: slice_spec(p) for n, p in engine.module.named_parameters()}
    local = {n: v.detach().float().clone() for n, v in engine.module.state_dict().items() if n in specs}
    slices = all_gather_object(local, group=unit.get_tensor_model_parallel_group())
    return {n: join_slices([s[n] for s in slices], specs[n]) if specs[n] else local[n] for n in local}


def _tp_run(rank, tp, stages):
    import shardspeed
    from examples.gpt_model import GPTConfig
    from examples.megatron_gpt.model import ParallelGPT

    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=tp)
    dp, dp_rank = unit.get_data_parallel_world_size(), unit.get_data_parallel_rank()
    out = {}
    for stage in stages:
        torch.manual_seed(SEED)
        engine, *_ = shardspeed.initialize(model=ParallelGPT(GPTConfig(**CFG)), config=_config(stage, dp), mpu=unit)
        for step in range(STEPS):
            x, y = _batches(step, dp)
            for m in range(GAS):
                lo = (dp_rank * GAS + m) * MICRO
                engine.backward(engine(x[lo:lo + MICRO], y[lo:lo + MICRO]))
                engine.step()
        out[stage] = full_params(engine, unit)
    return out


def _reference(dp):
    from examples.gpt_model import GPTConfig
    from examples.megatron_gpt.model import ParallelGPT, load_plain

    c = GPTConfig(**CFG)
    torch.manual_seed(SEED)
    model = load_plain(ParallelGPT(c).state_dict(), c)  # T = 1 here: no model-parallel unit in this process
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(STEPS):
        x, y = _batches(step, dp)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tp, world", [(2, 4), (4, 4)])
def test_tensor_parallel_gpt_with_zero_equals_single_process(tp, world):
    stages = (0, 1, 3)
    results = run_ranks(_tp_run, world, tp, stages, timeout=600)
    ref = _reference(world // tp)
    for rank, r in enumerate(results):
        for stage in stages:
            assert max_rel_diff(r[stage], ref) < 1e-5, (rank, stage, max_rel_diff(r[stage], ref))
