"""The pipeline engine (engine/pipe_engine.py) against plain single-process PyTorch: a tied
embedding/head model cut into 2 stages, 1F1B, accumulation 4, AdamW, clipping that bites, ZeRO
0/1/2, at P=2 x D=1 and P=2 x D=2: losses, global norms and every parameter equal the
``nn.Sequential`` of the same layers to 1e-5; ``eval_batch`` between steps changes nothing; and the
errors a user meets name the stage, the micro-batch and ``train_batch``."""

import pytest
import torch

from tests.distributed import pipe_workloads as pw
from tests.distributed.harness import run_ranks

MICRO, GAS, STEPS, LR, WD, CLIP = 2, 4, 3, 1e-2, 0.01, 0.05


def _config(stage: int, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, **extra}


def _engine(stage: int, **extra):
    import shardspeed
    from shardspeed.pipe import PipelineModule

    module = PipelineModule(pw.layers(), num_stages=2, loss_fn=pw.loss_fn, partition_method="uniform")
    module.load_global_state_dict(pw.reference_model().state_dict())  # the reference's initial values
    engine, *_ = shardspeed.initialize(model=module, config=_config(stage, **extra))
    return engine


def _global_state(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.global_state_dict().items()}


def _train(rank, stages):
    from shardspeed import comm

    comm.init_distributed()
    dp = comm.get_world_size() // 2
    out = {}
    for stage in stages:
        engine = _engine(stage)
        d = engine.topo.dp_rank
        losses, norms, states = [], [], []
        for step in range(STEPS):
            if step == 1:  # an evaluation between steps must change nothing
                before = _global_state(engine)
                ev = engine.eval_batch(iter(pw.micro_batches(50, d, dp, MICRO, GAS)))
                ev_logits = engine.eval_batch(iter(pw.micro_batches(50, d, dp, MICRO, GAS)), return_logits=True)
                out[f"eval_{stage}"] = (float(ev), float(ev_logits[0]), ev_logits[1] is None,
                                        all(torch.equal(v, _global_state(engine)[k]) for k, v in before.items()))
            losses.append(float(engine.train_batch(iter(pw.micro_batches(step, d, dp, MICRO, GAS)))))
            norms.append(engine.get_global_grad_norm())
            states.append(_global_state(engine))
        out[stage] = (losses, norms, states)
    return out


def _eval_reference(dp: int) -> float:
    model = pw.reference_model()
    # after one step of training: recompute from the reference's first state
    _, _, states = pw.reference(1, dp, MICRO, GAS, LR, WD, CLIP)
    model.load_state_dict(states[0])
    with torch.no_grad():
        batches = [b for d in range(dp) for b in pw.micro_batches(50, d, dp, MICRO, GAS)]
        return sum(pw.loss_fn(model(i), y).item() for i, y in batches) / len(batches)


def _check(results, dp, stages):
    ref_losses, ref_norms, ref_states = pw.reference(STEPS, dp, MICRO, GAS, LR, WD, CLIP)
    ev_ref = _eval_reference(dp)
    assert all(n > CLIP for n in ref_norms)  # clipping bites at every step
    for rank, res in enumerate(results):
        for stage in stages:
            losses, norms, states = res[stage]
            assert losses == pytest.approx(ref_losses, rel=1e-5), (rank, stage)
            assert norms == pytest.approx(ref_norms, rel=1e-5), (rank, stage)
            for step, state in enumerate(states):
                assert state, (rank, stage)
                for name, value in state.items():
                    where = f"rank {rank} zero {stage} step {step} {name}"
                    torch.testing.assert_close(value, ref_states[step][name], rtol=1e-5, atol=1e-6,
                                               msg=lambda m, w=where: f"{w}: {m}")
            ev, ev2, no_logits, unchanged = res[f"eval_{stage}"]
            assert ev == pytest.approx(ev_ref, rel=1e-5) and ev2 == ev and unchanged, (rank, stage)
            assert no_logits == (rank < dp)  # logits only on the last stage (ranks p * D + d)


def test_pipeline_p2_d1_equals_single_process():
    _check(run_ranks(_train, 2, (0, 1, 2)), 1, (0, 1, 2))


def test_pipeline_p2_d2_equals_single_process():
    _check(run_ranks(_train, 4, (0, 1, 2)), 2, (0, 1, 2))


def _fp16_and_bad_output(rank):
    from torch import nn

    import shardspeed
    from shardspeed import comm
    from shardspeed.pipe import PipelineModule

    comm.init_distributed()
    out = {}
    engine = _engine(1, fp16={"enabled": True, "initial_scale_power": 8, "hysteresis": 1})
    before = _global_state(engine)
    hook = None
    if engine.is_first_stage():  # an overflow in one stage's gradient only
        p = dict(engine.module.named_parameters())["1.fc1.weight"]
        hook = p.register_hook(lambda g: torch.full_like(g, float("inf")))
    data = lambda step: iter(pw.micro_batches(step, 0, 1, MICRO, GAS))  # noqa: E731
    engine.train_batch(data(0))
    out["skipped"] = (engine.skipped_steps, engine.loss_scale,
                      all(torch.equal(v, before[k]) for k, v in _global_state(engine).items()))
    if hook is not None:
        hook.remove()
    loss = engine.train_batch(data(1))
    out["stepped"] = (engine.skipped_steps, bool(torch.isfinite(loss)),
                      any(not torch.equal(v, before[k]) for k, v in _global_state(engine).items()))
    # a stage whose output is not tensors: stage 0 says which stage and what; stage 1, left waiting
    # for the activation, fails in its receive instead of hanging
    bad = PipelineModule([nn.Linear(4, 4), lambda x: {"h": x, "why": "text"}, nn.Linear(4, 4), nn.Linear(4, 4)],
                         num_stages=2, loss_fn=lambda y, t: y.sum(), partition_method="uniform")
    engine, *_ = shardspeed.initialize(model=bad, config=_config(0))
    try:
        engine.train_batch(iter([(torch.ones(2, 4), torch.ones(2, 4))] * GAS))
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def test_fp16_overflow_in_one_stage_skips_everywhere_and_bad_outputs_are_named():
    results = run_ranks(_fp16_and_bad_output, 2, extra_env={"SHARDSPEED_COMM_TIMEOUT_S": "5"}, timeout=120)
    for rank, r in enumerate(results):
        assert r["skipped"] == (1, 128.0, True), (rank, r["skipped"])
        assert r["stepped"] == (1, True, True), (rank, r["stepped"])
    assert ("TypeError: pipeline stage 0 (layers 0..1) returned a dict that cannot go to stage 1: "
            "output['why'] is a str") in results[0]["error"]
    assert results[1]["error"].startswith("CollectiveError: pipeline receive from rank 0 of 512 bytes"), results[1]


def _early_grads(rank):
    from shardspeed import comm

    comm.init_distributed()
    out = {}
    for early in (True, False):
        engine = _engine(1, pipeline={"early_grads": early})
        events: list = []
        send_now = engine.p2p.send_now
        engine.p2p.send_now = lambda op, f=send_now, ev=events: (ev.append(("send", op.tag)), f(op))[1]
        name, weight = next((n, p) for n, p in engine.module.named_parameters() if n.endswith("fc1.weight"))
        weight.register_post_accumulate_grad_hook(lambda p, ev=events, n=name: ev.append(("wgrad", n)))
        losses = [float(engine.train_batch(iter(pw.micro_batches(step, 0, 1, MICRO, GAS)))) for step in range(2)]
        out[early] = (events, losses, _global_state(engine))
    return out


def test_the_cool_downs_gradient_is_sent_before_the_weight_gradients_with_the_same_results():
    # P=2, m=4: stage 1's last backward (Note: early gradient sends in schedule.py) sends its input gradient
    # between its input and weight halves; every other gradient travels in its tick, and the results do not change
    results = run_ranks(_early_grads, 2)
    first, last = results[0], results[1]
    w0, w1 = first[True][0][0][1], last[True][0][0][1]
    assert first[True][0] == [("wgrad", w0)] * 8  # stage 0 has nobody to send to: whole backwards
    assert last[True][0] == ([("wgrad", w1)] * 3 + [("send", 3), ("wgrad", w1)]) * 2
    assert first[False][0] == [("wgrad", w0)] * 8 and last[False][0] == [("wgrad", w1)] * 8
    for r in results:
        assert r[True][1] == r[False][1]
        for k, v in r[True][2].items():
            torch.testing.assert_close(v, r[False][2][k], rtol=1e-6, atol=1e-7)
