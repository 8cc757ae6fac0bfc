"""The pipeline engine beyond two stages: P=4 x D=1 and 3D (P=2 x T=2 x D=2, tensor-parallel layers
inside each stage, a tied vocabulary-parallel embedding/head across the first and last stage) train
10 steps (accumulation 4, AdamW, clipping that bites) equal to single-process PyTorch on the same
unsliced layers, at ZeRO 0, 1 and 2; the global norm is the whole model's (slices summed, replicated
and tied parameters once, every stage). In the P=4 launch also: activations held per stage (1F1B:
p - s micro-batches, GPipe: m), and activation checkpointing inside stages equal to the plain run.
bf16 and fp16 at P=2 x D=2 track the fp32 reference. One launch per layout."""

import pytest
import torch

from tests.distributed import pipe_workloads as pw
from tests.distributed.harness import run_ranks
from tests.distributed.workloads import LOW_PRECISION_TOL, model_rel_diff

MICRO, GAS, STEPS, LR, WD, CLIP = 2, 4, 10, 1e-2, 0.01, 0.05
STAGES = (0, 1, 2)


def _config(stage: int, gas: int = GAS, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, **extra}


def _slices(engine) -> dict:
    """Global name -> (dim, stride) of this rank's tensor-parallel slices (None: whole tensor)."""
    from shardspeed.tensor_parallel import slice_spec

    out = {}
    for name, p in engine.module.named_parameters():
        spec = slice_spec(p)
        out[engine.module.global_state_name(name)] = None if spec is None else (spec.dim, spec.stride)
    return out


def _train(engine, steps: int = STEPS) -> tuple:
    """``steps`` batches on this rank's data: (losses, norms, final layer-indexed state)."""
    d, dp = engine.topo.dp_rank, engine.topo.dp_world_size
    losses, norms = [], []
    for step in range(steps):
        losses.append(float(engine.train_batch(iter(pw.micro_batches(step, d, dp, MICRO, GAS)))))
        norms.append(engine.get_global_grad_norm())
    state = {k: v.detach().float().clone() for k, v in engine.module.global_state_dict().items()}
    return losses, norms, state


def _check_parity(results, ref, stages=STAGES, what=""):
    ref_losses, ref_norms, ref_states = ref
    final = ref_states[-1]
    assert all(n > CLIP for n in ref_norms)  # clipping bites at every step
    from shardspeed.tensor_parallel import SliceSpec, take_slice

    for rank, res in enumerate(results):
        tp_rank, tp = res["tp"]
        for stage in stages:
            losses, norms, state = res[stage]
            assert losses == pytest.approx(ref_losses, rel=1e-5), (what, rank, stage)
            assert norms == pytest.approx(ref_norms, rel=1e-5), (what, rank, stage)
            assert state, (rank, stage)
            for name, value in state.items():
                spec = res["slices"].get(name)
                want = final[name] if spec is None else take_slice(final[name], SliceSpec(*spec), tp, tp_rank)
                torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, w=f"{what} rank {rank} zero {stage} {name}": f"{w}: {m}")


# -- P=4 x D=1: parity, activations held per schedule, activation checkpointing ------------------------
def _p4(rank):
    import shardspeed
    from shardspeed import comm
    from shardspeed.pipe import PipelineModule

    comm.init_distributed()

    def engine(stage, gas=GAS, interval=0, **extra):
        module = PipelineModule(pw.layers(), num_stages=4, loss_fn=pw.loss_fn, partition_method="uniform",
                                activation_checkpoint_interval=interval)
        module.load_global_state_dict(pw.reference_model().state_dict())
        return shardspeed.initialize(model=module, config=_config(stage, gas, **extra))[0]

    out = {"tp": (0, 1)}
    for stage in STAGES:
        e = engine(stage)
        out["slices"] = _slices(e)
        out[stage] = _train(e)
    counted = {"activation_stats": True}  # bytes held, on request (pipe_stats.py, Note: bytes on request)
    plain = engine(1, pipeline=counted)
    plain.train_batch(iter(pw.micro_batches(0, 0, 1, MICRO, GAS)))
    recompute = engine(1, interval=1, pipeline=counted)
    out["recompute"] = _train(recompute)
    out["held_bytes"] = (plain.pipe_stats()["peak_activation_bytes"], recompute.pipe_stats()["peak_activation_bytes"])
    # memory: what each stage holds awaiting backward, per schedule (m = 8 micro-batches)
    for schedule in ("1f1b", "gpipe"):
        e = engine(0, gas=8, pipeline={"schedule": schedule, **counted})
        e.train_batch(iter(pw.micro_batches(0, 0, 1, MICRO, 8)))
        out[schedule] = e.pipe_stats()
    return out


def test_pipeline_p4_parity_memory_and_recompute():
    results = run_ranks(_p4, 4)
    ref = pw.reference(STEPS, 1, MICRO, GAS, LR, WD, CLIP)
    _check_parity(results, ref, what="P=4")
    _check_parity(results, ref, stages=("recompute",), what="P=4 recompute")
    # recomputing every layer keeps only each layer's input: less held on the stages with blocks and the head
    # (stage 0's embedding saves its ids either way)
    held = [r["held_bytes"] for r in results]
    assert held[0][1] == held[0][0] and all(0 < rec < plain for plain, rec in held[1:]), held
    for s, r in enumerate(results):
        one_f_one_b, gpipe = r["1f1b"], r["gpipe"]
        assert (one_f_one_b["schedule"], gpipe["schedule"]) == ("1f1b", "gpipe")
        assert one_f_one_b["peak_micro_batches"] == 4 - s, (s, one_f_one_b)  # p - s
        assert gpipe["peak_micro_batches"] == 8, (s, gpipe)  # m
        # every micro-batch holds the same activations: bytes scale with the count
        per_mb = gpipe["peak_activation_bytes"] / 8
        assert per_mb > 0 and one_f_one_b["peak_activation_bytes"] == pytest.approx(per_mb * (4 - s)), s


# -- 3D: P=2 x T=2 x D=2 ------------------------------------------------------------------------------
def _p2_t2_d2(rank):
    import shardspeed
    from shardspeed import comm
    from shardspeed.pipe import PipelineModule

    comm.init_distributed()
    unit = shardspeed.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=2)
    out = {"tp": (unit.get_tensor_model_parallel_rank(), unit.get_tensor_model_parallel_world_size())}
    for stage in STAGES:
        module = PipelineModule(pw.tp_layers(), topology=unit.topology(), loss_fn=pw.tp_loss_fn,
                                partition_method="uniform", seed_layers=True)
        engine = shardspeed.initialize(model=module, config=_config(stage))[0]
        out["slices"] = _slices(engine)
        out[stage] = _train(engine)
    return out


def test_pipeline_3d_p2_t2_d2_equals_single_process():
    results = run_ranks(_p2_t2_d2, 8)
    assert sorted(r["tp"] for r in results) == [(0, 2)] * 4 + [(1, 2)] * 4
    sliced = {n for r in results for n, spec in r["slices"].items() if spec is not None}
    assert sliced == {"0.weight", "1.fc1.weight", "1.fc1.bias", "1.fc2.weight", "2.fc1.weight", "2.fc1.bias",
                      "2.fc2.weight", "3.fc1.weight", "3.fc1.bias", "3.fc2.weight"}, sliced
    _check_parity(results, pw.reference(STEPS, 2, MICRO, GAS, LR, WD, CLIP, model=pw.tp_reference_model()),
                  what="3D")


# -- bf16 / fp16 at P=2 x D=2 -------------------------------------------------------------------------
def _low_precision(rank):
    import shardspeed
    from shardspeed import comm
    from shardspeed.pipe import PipelineModule

    comm.init_distributed()
    out = {}
    for name, extra in (("bf16", {"bf16": {"enabled": True}}), ("fp16", {"fp16": {"enabled": True}})):
        module = PipelineModule(pw.layers(), num_stages=2, loss_fn=pw.loss_fn, partition_method="uniform")
        module.load_global_state_dict(pw.reference_model().state_dict())
        engine = shardspeed.initialize(model=module, config=_config(1, **extra))[0]
        out[name] = _train(engine, steps=5)
    return out


def test_pipeline_bf16_and_fp16_track_fp32():
    results = run_ranks(_low_precision, 4)
    ref = pw.reference(5, 2, MICRO, GAS, LR, WD, CLIP)[2][-1]
    for name in ("bf16", "fp16"):
        # the whole model: the last stage's ranks (2, 3) hold layers 3..4, the first's (0, 1) 0..2
        whole = {**results[0][name][2], **results[2][name][2]}
        assert whole.keys() == ref.keys()
        diff = model_rel_diff(whole, ref)
        assert 0 < diff < LOW_PRECISION_TOL, (name, diff)
        assert results[0][name][0] == results[3][name][0]  # every rank returns the same losses
