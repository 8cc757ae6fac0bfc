"""The engine in one process (no launcher): the loop, counters, components, precision, errors."""

import io
import logging
import re

import pytest
import torch

import shardspeed
from shardspeed.config import ConfigError
from tests.distributed.workloads import max_rel_diff, micro_slices, reference_run, tiny_gpt

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}


def _engine(config, model=None, **kw):
    config = {"steps_per_print": None, **config}
    return shardspeed.initialize(model=model or tiny_gpt(), config=config, **kw)


def _train(engine, steps):
    for step in range(steps):
        for x, y in micro_slices(step, 0, 1, engine.train_micro_batch_size_per_gpu(),
                                 engine.gradient_accumulation_steps()):
            engine.backward(engine(x, y))
            engine.step()


def test_single_process_equals_plain_pytorch_with_accumulation_and_clipping():
    engine, opt, _, _ = _engine({"train_batch_size": 8, "gradient_accumulation_steps": 4, "optimizer": ADAMW,
                                 "gradient_clipping": 0.3})
    _train(engine, 4)
    ref = reference_run(4, 8, 3e-3, 0.01, 0.3)
    ours = {n: p.detach() for n, p in engine.module.named_parameters()}
    assert max_rel_diff(ours, ref["params"]) < 1e-5


def test_counters_and_boundaries():
    engine, *_ = _engine({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW})
    assert engine.gradient_accumulation_steps() == 3 and engine.train_batch_size() == 6
    assert engine.train_micro_batch_size_per_gpu() == 2
    seen = []
    for step in range(2):
        for x, y in micro_slices(step, 0, 1, 2, 3):
            seen.append(engine.is_gradient_accumulation_boundary())
            engine.backward(engine(x, y))
            engine.step()
    assert seen == [False, False, True] * 2
    assert (engine.global_steps, engine.micro_steps, engine.skipped_steps, engine.global_samples) == (2, 6, 0, 12)
    assert engine.get_global_grad_norm() is None  # not computed: no clipping, no fp16


def test_scheduler_steps_only_at_boundaries():
    sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 4,
                                             "warmup_type": "linear"}}
    engine, _, _, lr_sched = _engine({"train_batch_size": 4, "gradient_accumulation_steps": 2, "optimizer": ADAMW,
                                      "scheduler": sched})
    assert isinstance(lr_sched, shardspeed.optim.WarmupLR) and engine.get_lr() == [0.0]
    _train(engine, 2)
    assert engine.get_lr() == pytest.approx([5e-4])


def test_client_optimizer_factory_and_scheduler():
    model = tiny_gpt()
    client = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, opt, _, sched = _engine({"train_batch_size": 2}, model=model, optimizer=client,
                                    lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    assert opt is client and isinstance(sched, torch.optim.lr_scheduler.StepLR)
    _train(engine, 2)
    assert engine.get_lr() == [0.125]
    engine, opt, _, _ = _engine({"train_batch_size": 2}, optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    assert isinstance(opt, torch.optim.Adam)
    _train(engine, 1)


def test_model_parameters_param_groups():
    model = tiny_gpt()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    engine, opt, _, _ = _engine({"train_batch_size": 2, "optimizer": ADAMW}, model=model, model_parameters=groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    _train(engine, 1)


def test_given_twice_errors():
    model = tiny_gpt()
    with pytest.raises(ConfigError, match="an optimizer was given twice"):
        _engine({"train_batch_size": 2, "optimizer": ADAMW}, model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="an lr scheduler was given twice"):
        _engine({"train_batch_size": 2, "optimizer": ADAMW, "scheduler": {"type": "WarmupLR"}},
                lr_scheduler=lambda o: None)


def test_unknown_zero_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="config key 'zero_optimization.stage': Input should be less than or equal "
                                          "to 3 \\(got 4\\)"):
        _engine({"train_batch_size": 2, "optimizer": ADAMW, "zero_optimization": {"stage": 4}})


def test_bf16_keeps_fp32_masters_and_optimizer_state():
    model = tiny_gpt()
    original = [p.detach().clone() for p in model.parameters()]
    engine, opt, _, _ = _engine({"train_batch_size": 2, "optimizer": ADAMW, "bf16": {"enabled": True}}, model=model)
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    # masters start from the full-precision weights, not from their bf16 rounding
    assert all(torch.equal(m, o) for m, o in zip(opt.param_groups[0]["params"], original))
    _train(engine, 2)
    for group in opt.param_groups:
        for master in group["params"]:
            assert master.dtype == torch.float32
            assert opt.state[master]["exp_avg"].dtype == torch.float32
    for p in engine.module.parameters():
        assert p.grad is None  # low-precision grads are freed once folded into the fp32 buffer
    master = opt.param_groups[0]["params"][0]
    assert torch.equal(master.to(torch.bfloat16), next(engine.module.parameters()).detach())


def test_fp16_trains_a_tiny_model_with_dynamic_scale():
    engine, *_ = _engine({"train_batch_size": 2, "optimizer": ADAMW,
                          "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2}})
    assert engine.loss_scale == 256
    _train(engine, 4)
    assert engine.skipped_steps == 0 and engine.loss_scale == 1024


def test_fp16_overflow_is_skipped_counted_and_logged():
    engine, *_ = _engine({"train_batch_size": 2, "optimizer": ADAMW,
                          "fp16": {"enabled": True, "initial_scale_power": 4, "hysteresis": 1}})
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger("shardspeed").addHandler(handler)
    try:
        (x, y), = micro_slices(0, 0, 1, 2, 1)
        engine.backward(engine(x, y) * float("inf"))
        engine.step()
    finally:
        logging.getLogger("shardspeed").removeHandler(handler)
    assert engine.skipped_steps == 1 and engine.global_steps == 1 and engine.loss_scale == 8
    assert "step 0: fp16 gradient overflow, step skipped; loss scale 16 -> 8" in buf.getvalue()


def test_fp32_nan_gradient_is_an_error_not_a_silent_skip():
    engine, *_ = _engine({"train_batch_size": 2, "optimizer": ADAMW, "gradient_clipping": 1.0})
    (x, y), = micro_slices(0, 0, 1, 2, 1)
    engine.backward(engine(x, y) * float("nan"))
    with pytest.raises(FloatingPointError, match="gradient norm is not finite at step 0"):
        engine.step()


def test_backward_needs_a_scalar_and_step_needs_an_optimizer():
    engine, *_ = _engine({"train_batch_size": 2})
    (x, y), = micro_slices(0, 0, 1, 2, 1)
    with pytest.raises(ValueError, match=r"scalar loss tensor, got Tensor of shape \(2, 16, 64\)"):
        engine.backward(engine(x))
    engine.backward(engine(x, y))
    with pytest.raises(RuntimeError, match="engine.step\\(\\) needs an optimizer"):
        engine.step()


def test_train_eval_zero_grad_and_input_casting():
    engine, *_ = _engine({"train_batch_size": 2, "optimizer": ADAMW, "bf16": {"enabled": True}})
    engine.eval()
    assert not engine.module.training
    engine.train()
    assert engine.module.training
    (x, y), = micro_slices(0, 0, 1, 2, 1)
    engine.backward(engine(x, y))
    engine.strategy.wait_reductions()
    assert any(m.grad.abs().sum() > 0 for m in engine.optimizer.param_groups[0]["params"])
    engine.zero_grad()
    assert all(m.grad.abs().sum() == 0 for m in engine.optimizer.param_groups[0]["params"])
    lin = shardspeed.initialize(model=torch.nn.Linear(3, 1), config={"train_batch_size": 1,
                                                                      "bf16": {"enabled": True}})[0]
    assert lin(torch.ones(1, 3)).dtype == torch.bfloat16  # float inputs follow the compute dtype


def test_training_data_gives_a_sharded_loader_with_collate_fn():
    data = [{"x": torch.tensor([float(i)]), "y": torch.tensor([float(i)])} for i in range(10)]

    def collate(items):
        return torch.cat([i["x"] for i in items]), torch.cat([i["y"] for i in items])

    engine, _, loader, _ = _engine({"train_micro_batch_size_per_gpu": 4}, model=torch.nn.Linear(1, 1),
                                   training_data=data, collate_fn=collate)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[0] for b in batches]).tolist()) == [float(i) for i in range(10)]
    rep = shardspeed.RepeatingLoader(loader)
    got = [next(rep) for _ in range(7)]
    assert len(got) == 7 and rep.epoch == 2


def test_logging_every_steps_per_print_with_breakdown():
    log = logging.getLogger("shardspeed")
    engine, *_ = _engine({"train_batch_size": 2, "optimizer": ADAMW, "wall_clock_breakdown": True,
                          "steps_per_print": 2})
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    log.addHandler(handler)
    try:
        engine.config.steps_per_print = 2
        _train(engine, 4)
    finally:
        log.removeHandler(handler)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("step=")]
    assert [ln.split()[0] for ln in lines] == ["step=2", "step=4"]
    for key in ("loss=", "lr=3.000e-03", "loss_scale=1", "samples/s=", "forward=", "backward=", "step="):
        assert key in lines[0]


def test_deepspeed_script_runs_unchanged(tmp_path):
    import argparse
    import json

    import shardspeed as deepspeed

    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 2, "optimizer": ADAMW, "steps_per_print": None}))
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(cfg)])
    model = tiny_gpt()
    model_engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model,
                                                         model_parameters=model.parameters())
    assert isinstance(model_engine, deepspeed.DeepSpeedEngine) and model_engine.module is model
    _train(model_engine, 1)
    assert model_engine.global_steps == 1


def test_loader_position_round_trips():
    from shardspeed.data import ResumableLoader, build_dataloader

    data = list(range(20))

    def fresh():
        return ResumableLoader(build_dataloader(data, 2, 0, 1, collate_fn=list))

    a = fresh()
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    rest_a = list(it)
    b = fresh()
    b.load_state_dict(state)
    assert list(b) == rest_a and state == {"epoch": 0, "position": 3} and len(first) == 3
    assert [x for batch in list(b) for x in batch] != [x for batch in first + rest_a for x in batch]  # new epoch


@pytest.mark.parametrize("extra,message", [
    ({"zero_optimization": {"stage": 2, "optimizer_in_backward": True}},
     "zero_optimization.optimizer_in_backward needs ZeRO stage 3, got stage 2"),
    ({"gradient_clipping": 1.0},
     "before the global gradient norm is known: set gradient_clipping to 0 (it is 1) or turn optimizer_in_backward"),
    ({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2},
     "gradients cannot accumulate over micro-batches: gradient_accumulation_steps is 2; use 1"),
    ({"fp16": {"enabled": True}}, "before fp16's overflow check has seen every gradient: use bf16 or fp32"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}},
     "FusedLamb needs norms over whole parameters across ranks at its step: use an element-wise optimizer"),
])
def test_optimizer_in_backward_refuses_what_needs_every_gradient_first(extra, message):
    config = {"train_batch_size": 2, "optimizer": ADAMW,
              "zero_optimization": {"stage": 3, "optimizer_in_backward": True}, **extra}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _engine(config)


def test_optimizer_in_backward_single_process_equals_plain_pytorch():
    engine, *_ = _engine({"train_batch_size": 4, "optimizer": ADAMW,
                          "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2, "warmup_max_lr": 3e-3}},
                          "zero_optimization": {"stage": 3, "optimizer_in_backward": True}})
    _train(engine, 3)
    ref, *_ = _engine({"train_batch_size": 4, "optimizer": ADAMW,  # stage 0: the ordinary step after backward
                       "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2, "warmup_max_lr": 3e-3}}})
    _train(ref, 3)
    ours = {n: p.detach() for n, p in engine.module.state_dict().items()}
    theirs = {n: p.detach() for n, p in ref.module.state_dict().items()}
    assert max_rel_diff(ours, theirs) < 1e-6
    assert engine.get_lr() == ref.get_lr()


def test_optimizer_in_backward_without_an_optimizer_says_so_in_backward():
    # reduce_bucket_size 1: each unit's reduction is retired (and stepped) as the next one launches
    engine, *_ = _engine({"train_batch_size": 2, "zero_optimization": {"stage": 3, "optimizer_in_backward": True,
                                                                       "reduce_bucket_size": 1}})
    (x, y), = micro_slices(0, 0, 1, 2, 1)
    with pytest.raises(RuntimeError, match=re.escape("zero_optimization.optimizer_in_backward needs the optimizer at "
                                                     "initialize(): pass optimizer=... or add an 'optimizer' section")):
        engine.backward(engine(x, y))
