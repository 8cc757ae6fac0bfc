"""The tensor-parallel GPT of examples/megatron_gpt trained with ZeRO over the data-parallel group
equals single-process PyTorch on the same, unsliced model (issue 13's parity): T=2 x D=2 and T=4 x
D=1, ZeRO stages 0-3, AdamW, accumulation 2, clipping that bites."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import LOW_PRECISION_TOL, max_rel_diff, model_rel_diff

STEPS, MICRO, GAS, SEED = 10, 2, 2, 7
CFG = {"vocab": 64, "seq": 16, "layers": 2, "hidden": 32, "heads": 4}


def _config(stage, dp, precision=None):
    extra = {precision: {"enabled": True}} if precision else {}
    return {**extra, "train_batch_size": MICRO * GAS * dp, "train_micro_batch_size_per_gpu": MICRO,
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


def _tp_run(rank, tp, stages, precision=None):
    import shardspeed
    from examples.gpt_model import GPTConfig
    from examples.megatron_gpt.model import ParallelGPT

    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=tp)
    dp, dp_rank = unit.get_data_parallel_world_size(), unit.get_data_parallel_rank()
    out = {}
    for stage in stages:
        torch.manual_seed(SEED)
        model = ParallelGPT(GPTConfig(**CFG))
        engine, *_ = shardspeed.initialize(model=model, config=_config(stage, dp, precision), mpu=unit)
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
    stages = (0, 1, 2, 3)
    results = run_ranks(_tp_run, world, tp, stages, timeout=600)
    ref = _reference(world // tp)
    for rank, r in enumerate(results):
        for stage in stages:
            assert max_rel_diff(r[stage], ref) < 1e-5, (rank, stage, max_rel_diff(r[stage], ref))


@pytest.mark.parametrize("precision, stage", [("bf16", 1), ("fp16", 2)])
def test_tensor_parallel_gpt_in_low_precision_tracks_fp32(precision, stage):
    """T=2 x D=2: bf16 (fp32 masters) and fp16 (loss scaling; an overflow on any rank skips the step
    everywhere) end within 1e-2 of the fp32 single-process model over all parameters."""
    results = run_ranks(_tp_run, 4, 2, (stage,), precision, timeout=600)
    ref = _reference(2)
    for rank, r in enumerate(results):
        assert model_rel_diff(r[stage], ref) < LOW_PRECISION_TOL, (rank, model_rel_diff(r[stage], ref))


SAVE_AT, LAST = 2, 5
# (T, ZeRO stage, micro-batch, accumulation) of the runs that resume the (T=2, D=2, stage 1) checkpoint
RESUMES = {"T4_stage3": (4, 3, 4, 2), "T4_stage0": (4, 0, 4, 2), "T1_D4_stage3": (1, 3, 2, 1)}


def _ckpt_config(stage, micro, gas):
    return {**_config(stage, 8 // (micro * gas)), "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas, "train_batch_size": 8}


def _train_steps(engine, first, last):
    from examples.gpt_model import synthetic_batch

    micro, gas, dp_rank = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), \
        engine.topo.dp_rank
    for step in range(first, last):
        x, y = synthetic_batch(step, 8, CFG["seq"], CFG["vocab"])
        for m in range(gas):
            lo = (dp_rank * gas + m) * micro
            engine.backward(engine(x[lo:lo + micro], y[lo:lo + micro]))
            engine.step()


def _resume_run(rank, ckpt, resumes):
    """Train (T=2, D=2, stage 1), save after step 2, go on to step 5; then resume the checkpoint at each
    other layout and train the same steps."""
    import shardspeed
    from examples.gpt_model import GPTConfig
    from examples.megatron_gpt.model import ParallelGPT
    from shardspeed import comm

    def build():
        torch.manual_seed(SEED)
        return ParallelGPT(GPTConfig(**CFG))

    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=2)
    engine, *_ = shardspeed.initialize(model=build(), config=_ckpt_config(1, 2, 2), mpu=unit)
    _train_steps(engine, 0, SAVE_AT)
    engine.save_checkpoint(ckpt)
    _train_steps(engine, SAVE_AT, LAST)
    out = {"straight": full_params(engine, unit)}
    for name, (tp, stage, micro, gas) in resumes.items():
        comm.destroy_model_parallel()
        unit = shardspeed.initialize_model_parallel(tensor_parallel_size=tp)
        engine, *_ = shardspeed.initialize(model=build(), config=_ckpt_config(stage, micro, gas), mpu=unit)
        engine.load_checkpoint(ckpt)
        _train_steps(engine, SAVE_AT, LAST)
        out[name] = full_params(engine, unit)
    return out


def test_example_gpt_checkpoint_resumes_at_other_tensor_parallel_layouts(tmp_path):
    """The tied vocab-parallel embedding/head included: saved at (T=2, D=2, ZeRO 1), resumed at (4, 1, 3),
    (4, 1, 0), (1, 4, 3) and in one process (unsliced), the next 3 steps equal the run that never stopped."""
    ckpt = str(tmp_path)
    runs = run_ranks(_resume_run, 4, ckpt, RESUMES, timeout=600)
    straight = runs[0]["straight"]
    single = run_ranks(_resume_run_single, 1, ckpt)[0]
    for rank, r in enumerate(runs):
        for name in RESUMES:
            assert max_rel_diff(r[name], straight) < 1e-5, (rank, name, max_rel_diff(r[name], straight))
    assert max_rel_diff(single, straight) < 1e-5


def _resume_run_single(rank, ckpt):
    import shardspeed
    from examples.gpt_model import GPTConfig
    from examples.megatron_gpt.model import ParallelGPT

    torch.manual_seed(SEED)
    engine, *_ = shardspeed.initialize(model=ParallelGPT(GPTConfig(**CFG)), config=_ckpt_config(0, 8, 1))
    engine.load_checkpoint(ckpt)
    _train_steps(engine, SAVE_AT, LAST)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
