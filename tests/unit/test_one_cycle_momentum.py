"""OneCycle cycles Adam's beta1 (or SGD's momentum) against the lr, as DeepSpeed's OneCycle does:
``cycle_max_mom`` at the lr's low end, ``cycle_min_mom`` at its peak, then ``max_mom * (1 + decay_mom_rate
* k)`` after the cycle; beta2 is left as the optimizer has it. And the engine's optimizer really steps
with the scheduled beta1."""

import pytest
import torch

import shardspeed
from shardspeed.optim import OneCycle


def _adam(betas=(0.9, 0.98)):
    return torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1, betas=betas)


def _trace(sched, opt, n):
    lrs, b1, b2 = [], [], []
    for i in range(n):
        if i:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        b1.append(opt.param_groups[0]["betas"][0])
        b2.append(opt.param_groups[0]["betas"][1])
    return lrs, b1, b2


def test_beta1_cycles_against_lr_and_decays_after():
    opt = _adam()
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4, cycle_second_step_size=4,
                 cycle_min_mom=0.85, cycle_max_mom=0.95, decay_step_size=2, decay_mom_rate=0.02, decay_lr_rate=1.0)
    lrs, b1, b2 = _trace(s, opt, 13)
    assert lrs[:9] == pytest.approx([0.01, 0.035, 0.06, 0.085, 0.11, 0.085, 0.06, 0.035, 0.01])
    assert b1[:9] == pytest.approx([0.95, 0.925, 0.9, 0.875, 0.85, 0.875, 0.9, 0.925, 0.95])
    # after the cycle (step 8 + k): beta1 = 0.95 * (1 + 0.02 * k / 2), lr = 0.01 / (1 + k / 2)
    assert b1[10] == pytest.approx(0.95 * 1.02) and b1[12] == pytest.approx(0.95 * 1.04)
    assert lrs[10] == pytest.approx(0.01 / 2) and lrs[12] == pytest.approx(0.01 / 3)
    assert b2 == [0.98] * 13  # beta2 is the optimizer's, never replaced


def test_momentum_stairs_and_opt_out():
    opt = _adam()
    s = OneCycle(opt, cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=4, cycle_first_stair_count=2,
                 cycle_min_mom=0.8, cycle_max_mom=0.9)
    _, b1, _ = _trace(s, opt, 5)
    assert b1 == pytest.approx([0.9, 0.9, 0.85, 0.85, 0.8])  # held flat across each half-stair
    opt = _adam(betas=(0.7, 0.9))
    s = OneCycle(opt, cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=2, cycle_momentum=False)
    _, b1, _ = _trace(s, opt, 4)
    assert b1 == [0.7] * 4


def test_state_round_trip_restores_momentum():
    opt = _adam()
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4, cycle_min_mom=0.85,
                 cycle_max_mom=0.95)
    for _ in range(3):
        s.step()
    opt2 = _adam()
    s2 = OneCycle(opt2, cycle_min_lr=0.01, cycle_max_lr=0.11, cycle_first_step_size=4, cycle_min_mom=0.85,
                  cycle_max_mom=0.95)
    s2.load_state_dict(s.state_dict())
    assert opt2.param_groups[0]["betas"] == pytest.approx(opt.param_groups[0]["betas"]) == (0.875, 0.98)


def test_engine_steps_with_the_scheduled_beta1():
    """The engine with Adam + OneCycle from the config equals plain torch Adam whose lr and beta1 are set by
    hand to the schedule's values before every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref.load_state_dict(model.state_dict())
    sched = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.05, "cycle_first_step_size": 3, "cycle_min_mom": 0.5,
             "cycle_max_mom": 0.95}
    engine, *_ = shardspeed.initialize(model=model, config={
        "train_batch_size": 4, "steps_per_print": None, "gradient_clipping": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.99]}},
        "scheduler": {"type": "OneCycle", "params": sched}})
    opt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.9, 0.99))
    frac = [0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, 0]
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 1, generator=g)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        for group in opt.param_groups:
            group["lr"] = 0.01 + 0.04 * frac[step]
            group["betas"] = (0.95 - 0.45 * frac[step], 0.99)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    assert engine.optimizer.param_groups[0]["betas"][0] == pytest.approx(0.95)  # step 8: back at the low lr


def test_one_cycle_config_builds_through_the_config():
    from shardspeed.config import load_config
    from shardspeed.optim import build_scheduler, one_cycle_config

    cfg = load_config({"scheduler": one_cycle_config(0.005, 0.02, total_steps=200)}).scheduler
    opt = _adam()
    lrs, b1, _ = _trace(build_scheduler(cfg, opt), opt, 201)
    assert lrs[0] == pytest.approx(0.005) and lrs[90] == pytest.approx(0.02) and lrs[180] == pytest.approx(0.005)
    assert b1[0] == pytest.approx(0.95) and b1[90] == pytest.approx(0.85) and b1[180] == pytest.approx(0.95)
    assert lrs[200] == pytest.approx(0.005 / 1.5)  # 20 steps = one tenth past the cycle: 1 / (1 + 0.5 * 1)
