"""Tensor slicing (T) x ZeRO data parallelism (D) in the engine, against plain single-process PyTorch
on the unsliced model: every ZeRO stage at T=2 x D=2 and one at T=4 x D=1 (AdamW, accumulation 2,
clipping that bites, fp32: 1e-5); LAMB's per-parameter norms; an fp16 overflow on one tensor-
parallel rank skipping the step everywhere; checkpoints written at (T=2, D=2, stage 1) resuming at
(1, 4, stage 3), (4, 1, stage 0) and in one process, and consolidated unsliced; per-rank bytes and
the model's FLOPs; partitioned activation checkpoints on the tensor-parallel group.

One launch of 4 ranks runs every scenario (tests/distributed/tp_workloads.py has the model and the
mpu); the tests below check its results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardspeed.tensor_parallel.meta import join_slices, take_slice
from tests.distributed import tp_workloads as tpw
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import max_rel_diff

C = tpw.TPConfig()
LR, WD, CLIP = 1e-2, 0.01, 0.05
GLOBAL_BATCH, STEPS, SAVE_AT = 8, 5, 2
ADAMW = {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}
LAMB = {"type": "Lamb", "params": {"lr": LR, "weight_decay": WD}}
SLICED = tpw.sliced_names(C)


def _config(stage: int, dp: int, micro: int = 2, optimizer: dict = ADAMW, **extra) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro, "steps_per_print": None,
            "optimizer": optimizer, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000,
                                  "stage3_param_persistence_threshold": 0}, **extra}


def _engine(model, stage, dp, mpu, micro=2, **extra):
    import shardspeed

    return shardspeed.initialize(model=model, config=_config(stage, dp, micro, **extra), mpu=mpu)[0]


def _train(engine, first, last, before_backward=None):
    """Steps [first, last) of the global batches; returns each step's gradient norm."""
    norms = []
    for step in range(first, last):
        for k, (x, y) in enumerate(tpw.batches(step, engine.topo.dp_rank, engine.dp_world_size,
                                               engine.train_micro_batch_size_per_gpu(),
                                               engine.gradient_accumulation_steps(), C)):
            loss = engine(x, y)
            if before_backward is not None:
                before_backward(step, k)
            engine.backward(loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    return norms


def _local(engine):
    """This rank's parameters as it holds them (its slices; stage 3 gathers its partitions)."""
    names = dict(engine.module.named_parameters())
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items() if k in names}


def _tp_model(mpu, **kw):
    return tpw.TPGPT(C, mpu.tp, mpu.t, mpu.tp_group, **kw)


def _every_stage(mpu, ckpt, profile_file):
    """Stages 0-3 at T=2 x D=2 from scratch; stage 1 saves after SAVE_AT steps and goes on; stage 0
    profiles FLOPs; stage 2 recomputes blocks with partitioned activations."""
    from shardspeed import checkpointing

    out = {}
    for stage in range(4):
        extra = {}
        if stage == 0:
            extra = {"flops_profiler": {"enabled": True, "profile_step": 1, "output_file": profile_file},
                     "throughput": {"seq_length": C.seq, "peak_tflops": 1.0}}
        if stage == 2:
            extra = {"activation_checkpointing": {"partition_activations": True}}
        engine = _engine(_tp_model(mpu, recompute=stage == 2), stage, 2, mpu, **extra)
        r = {"norms": _train(engine, 0, SAVE_AT)}
        if stage == 1:
            engine.save_checkpoint(ckpt, tag="t2d2")
            r["at_save"] = _local(engine)
            r["refusal"] = _refused_mark(engine, ckpt)
        r["norms"] += _train(engine, SAVE_AT, STEPS)
        r.update(params=_local(engine), memory=engine.memory_breakdown())
        if stage == 0:
            prof = engine.reporter.flops_profiler
            r.update(own_flops=prof.get_total_flops(), replicated_flops=prof.get_replicated_flops(),
                     model_flops=engine.reporter.throughput.forward_flops_per_sample * 2,
                     model_params=engine.reporter.throughput.n_params)
        if stage == 2:
            checkpointing.reset()
        if stage == 3:
            engine.save_16bit_model(str(Path(ckpt).parent / "16bit"))
        out[stage] = r
    return out


def _refused_mark(engine, ckpt):
    """A parameter marked with DeepSpeed's model_parallel but no dimension cannot be placed."""
    p = engine.module.head.weight
    p.model_parallel = True
    try:
        engine.save_checkpoint(ckpt, tag="never")
    except Exception as e:
        return str(e)
    finally:
        del p.model_parallel
    return ""


def _lamb_and_fp16(mpu):
    """LAMB at stages 0 and 3; fp16 at stage 1 with an overflow on global rank 1 only, in a sliced
    gradient at step 1 and in a replicated one at step 2."""
    from shardspeed.comm import get_rank

    out = {"lamb": {}}
    for stage in (0, 3):
        engine = _engine(_tp_model(mpu), stage, 2, mpu, optimizer=LAMB)
        _train(engine, 0, 3)
        out["lamb"][stage] = _local(engine)
    engine = _engine(_tp_model(mpu), 1, 2, mpu, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    blk = engine.module.blocks[0]
    targets = {1: blk.fc.weight, 2: engine.module.head.weight}  # sliced, replicated
    assert getattr(targets[1], "tensor_model_parallel", False) and not hasattr(targets[2], "tensor_model_parallel")
    hooks = []

    def poison(step, micro):
        while hooks:
            hooks.pop().remove()
        if step in targets and micro == 0 and get_rank() == 1:
            hooks.append(targets[step].register_hook(lambda g: torch.full_like(g, float("inf"))))

    snaps, scales = [], []
    for step in range(4):
        _train(engine, step, step + 1, poison)
        snaps.append(_local(engine))
        scales.append(engine.loss_scale)
    out["fp16"] = {"snaps": snaps, "scales": scales, "skipped": engine.skipped_steps}
    return out


def _resume(engine, ckpt):
    engine.load_checkpoint(ckpt, tag="t2d2")
    _train(engine, SAVE_AT, STEPS)
    return _local(engine)


def _other_layouts(mpu4, ckpt):
    """At T=4 x D=1: stage 3 from scratch, the stage-1 checkpoint at stage 0, a model of another
    size refused; at T=1 x D=4 (no mpu, the unsliced model): the checkpoint at stage 3."""
    out = {"t4_scratch": None}
    engine = _engine(_tp_model(mpu4), 3, 1, mpu4, micro=4)
    _train(engine, 0, STEPS)
    out["t4_scratch"] = _local(engine)
    out["t4_resumed"] = _resume(_engine(_tp_model(mpu4), 0, 1, mpu4, micro=4), ckpt)
    narrow = tpw.TPGPT(tpw.TPConfig(ffn=96), 4, mpu4.t, mpu4.tp_group)
    try:
        _engine(narrow, 0, 1, mpu4, micro=4).load_checkpoint(ckpt, tag="t2d2")
        out["t4_mismatch"] = ""
    except Exception as e:
        out["t4_mismatch"] = str(e)
    out["t1_resumed"] = _resume(_engine(tpw.TPGPT(C), 3, 4, None, micro=2), ckpt)
    return out


def _activations_on_the_tensor_group(pipe):
    """T=2 x P=2: the two pipe stages checkpoint different inputs; partitioning must split each
    input over its own tensor-parallel pair only."""
    from shardspeed import checkpointing

    torch.manual_seed(10 + pipe.p)  # per pipe stage; the same on both ranks of a tensor-parallel pair
    x0 = torch.randn(4, 6)
    w1, w2 = torch.randn(6, 8, requires_grad=True), torch.randn(8, 6, requires_grad=True)

    def region(x):
        return torch.tanh(x @ w1) @ w2

    def grads(recompute):
        x = x0.clone().requires_grad_(True)
        w1.grad = w2.grad = None
        out = checkpointing.checkpoint(region, x) if recompute else region(x)
        out.pow(2).sum().backward()
        return [x.grad, w1.grad.clone(), w2.grad.clone()]

    plain = grads(False)
    checkpointing.configure(pipe, partition_activations=True)
    kept = []
    orig = checkpointing._Kept.__init__

    def spy(self, t, s, slot):
        orig(self, t, s, slot)
        kept.append(self.data.numel())

    checkpointing._Kept.__init__ = spy
    try:
        part = grads(True)
    finally:
        checkpointing._Kept.__init__ = orig
        checkpointing.reset()
    return {"same": all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(plain, part)), "kept": kept}


def _worker(rank, ckpt, profile_file):
    import shardspeed

    shardspeed.init_distributed()
    mpu, pipe, mpu4 = tpw.GridMPU(2), tpw.GridMPU(2, pp=2), tpw.GridMPU(4)
    return {"tp_rank": mpu.t, "tp4_rank": mpu4.t, "stages": _every_stage(mpu, ckpt, profile_file),
            **_lamb_and_fp16(mpu), **_other_layouts(mpu4, ckpt), "acts": _activations_on_the_tensor_group(pipe)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    ckpt = str(root / "ckpt")
    results = run_ranks(_worker, 4, ckpt, str(root / "profile.txt"), timeout=400)
    adamw = tpw.reference(STEPS, GLOBAL_BATCH, lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=WD), CLIP, C)
    return {"ranks": results, "ckpt": ckpt, "ref": adamw}


def _slices_of(full: dict, tp: int, rank: int) -> dict:
    return {n: take_slice(t, SLICED[n], tp, rank) if n in SLICED and tp > 1 else t for n, t in full.items()}


def _joined(ranks, key_fn) -> dict:
    """Full tensors from the T=2 ranks of data-parallel rank 0 (global ranks 0 and 1)."""
    a, b = key_fn(ranks[0]), key_fn(ranks[1])
    return {n: join_slices([a[n], b[n]], SLICED[n]) if n in SLICED else a[n] for n in a}


def test_every_zero_stage_at_t2_d2_equals_single_process(run):
    ref = run["ref"][-1]
    for r in run["ranks"]:
        for stage, res in r["stages"].items():
            assert max_rel_diff(res["params"], _slices_of(ref, 2, r["tp_rank"])) < 1e-5, stage
            assert all(n > CLIP for n in res["norms"])  # clipping bit at every step


def test_save_16bit_model_joins_the_slices(run):
    saved = torch.load(Path(run["ckpt"]).parent / "16bit" / "pytorch_model.bin", weights_only=True)
    assert max_rel_diff(saved, run["ref"][-1]) < 1e-5


def test_t4_d1_equals_single_process(run):
    for r in run["ranks"]:
        assert max_rel_diff(r["t4_scratch"], _slices_of(run["ref"][-1], 4, r["tp4_rank"])) < 1e-5


def test_lamb_at_stages_0_and_3_equals_single_process(run):
    from shardspeed.optim import FusedLamb

    ref = tpw.reference(3, GLOBAL_BATCH, lambda p: FusedLamb(p, lr=LR, weight_decay=WD), CLIP, C)[-1]
    for r in run["ranks"]:
        for stage, params in r["lamb"].items():
            assert max_rel_diff(params, _slices_of(ref, 2, r["tp_rank"])) < 1e-5, stage


def test_fp16_overflow_on_one_tensor_parallel_rank_skips_the_step_on_all(run):
    for r in run["ranks"]:
        f = r["fp16"]
        assert f["skipped"] == 2
        assert f["scales"] == [256.0, 128.0, 64.0, 64.0]
        for step in (1, 2):  # the overflowing steps changed nothing, on any rank
            assert all(torch.equal(f["snaps"][step][n], f["snaps"][step - 1][n]) for n in f["snaps"][0])
        assert not torch.equal(f["snaps"][3]["head.weight"], f["snaps"][2]["head.weight"])
    # replicated parameters stayed equal on both tensor-parallel ranks (no replica stepped with inf)
    a, b = run["ranks"][0]["fp16"]["snaps"][3], run["ranks"][1]["fp16"]["snaps"][3]
    assert all(torch.equal(a[n], b[n]) for n in a if n not in SLICED)


def test_checkpoint_from_t2_d2_stage1_resumes_at_other_layouts(run):
    straight = _joined(run["ranks"], lambda r: r["stages"][1]["params"])
    for r in run["ranks"]:
        assert max_rel_diff(r["t4_resumed"], _slices_of(straight, 4, r["tp4_rank"])) < 1e-5  # (4, 1, stage 0)
        assert max_rel_diff(r["t1_resumed"], straight) < 1e-5  # (1, 4, stage 3), the unsliced model


def test_checkpoint_resumes_in_one_process_on_the_plain_model(run):
    import shardspeed

    straight = _joined(run["ranks"], lambda r: r["stages"][1]["params"])
    engine, *_ = shardspeed.initialize(model=tpw.TPGPT(C), config=_config(0, 1, micro=8))
    engine.load_checkpoint(run["ckpt"], tag="t2d2")
    _train(engine, SAVE_AT, STEPS)
    assert max_rel_diff({n: p.detach() for n, p in engine.module.named_parameters()}, straight) < 1e-5


def test_zero_to_fp32_writes_the_unsliced_model_and_replicated_parameters_once(run):
    from shardspeed.checkpoint import files
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    at_save = _joined(run["ranks"], lambda r: r["stages"][1]["at_save"])
    full = get_fp32_state_dict_from_zero_checkpoint(run["ckpt"], tag="t2d2")
    assert full.keys() == at_save.keys() and all(torch.equal(full[n], at_save[n]) for n in full)
    tpw.TPGPT(C).load_state_dict(full)  # names and shapes of the plain model
    saved = {}
    for rank in range(4):
        pieces = files.load_file(Path(run["ckpt"]) / "t2d2" / files.rank_file(rank))["pieces"]
        for name, ps in pieces.items():
            saved[name] = saved.get(name, 0) + sum(p[1] for p in ps)
    assert saved == {n: t.numel() for n, t in full.items()}  # every element written once, none twice


def test_checkpoint_errors_name_the_parameter(run):
    r0 = run["ranks"][0]
    assert r0["t4_mismatch"] == (
        "parameter 'blocks.0.fc.weight' has full shape (128, 32) in the checkpoint, but this model at "
        "tensor-parallel size 4 holds (24, 32) per rank: a full shape of (96, 32)")
    assert r0["stages"][1]["refusal"] == (
        "parameter 'head.weight' is marked model_parallel but not with the dimension it was cut along, which a "
        "checkpoint needs to place the slice in the full parameter: mark it with "
        "shardspeed.tensor_parallel.mark_sliced(param, dim, stride) instead")


def test_per_rank_bytes_of_sliced_layers_are_full_over_t(run):
    full = tpw.TPGPT(C)
    sliced = sum(p.numel() for n, p in full.named_parameters() if n in SLICED)
    replicated = sum(p.numel() for n, p in full.named_parameters() if n not in SLICED)
    held = sliced // 2 + replicated  # elements a T=2 rank holds before ZeRO (D=2) partitions them
    expected = {0: (4 * held, 4 * held, 8 * held), 1: (4 * held, 4 * held, 4 * held),
                2: (4 * held, 2 * held, 4 * held), 3: (2 * held, 2 * held, 4 * held)}
    for r in run["ranks"]:
        for stage, (params, grads, opt) in expected.items():
            m = r["stages"][stage]["memory"]
            got = (m["parameters"], m["gradients"], m["optimizer_states"])
            # within 1%: padding to D and AdamW's 4-byte step counters; unsliced layers would be 70% more
            assert all(abs(g - e) <= 0.01 * e for g, e in zip(got, (params, grads, opt))), (stage, got)


def test_flops_are_the_ranks_own_and_the_model_counts_once(run):
    from shardspeed.profiling import FlopsProfiler

    x, y = tpw.batches(0, 0, 1, 2, 1, C)[0]
    model = tpw.TPGPT(C)
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(x, y)
    prof.stop_profile()
    whole, replicated = prof.get_total_flops(), prof.get_replicated_flops()
    assert whole == replicated  # nothing sliced: all of it runs on every rank alike
    for r in run["ranks"]:
        s = r["stages"][0]
        assert s["model_flops"] == whole  # the whole model, once (per micro-batch of 2)
        assert s["own_flops"] - s["replicated_flops"] == (whole - s["replicated_flops"]) // 2  # sliced work: 1/T
        assert s["model_params"] == sum(p.numel() for p in model.parameters())


def test_partitioned_activations_split_over_the_tensor_parallel_group(run):
    for r in run["ranks"]:
        assert r["acts"]["same"]  # with the model-parallel group (4 ranks, 2 pipe stages) inputs get mixed up
        assert r["acts"]["kept"] == [4 * 6 // 2]  # half of the input on each rank of a pair
