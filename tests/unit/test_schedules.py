"""LR schedules: values at chosen steps, momentum cycling, state round trips, config errors."""

import math

import pytest
import torch

from shardspeed.config import ConfigError, load_config
from shardspeed.optim import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


def _opt(lr=0.1, cls=torch.optim.Adam, **kw):
    return cls([torch.zeros(1, requires_grad=True)], lr=lr, **kw)


def _lrs(sched, n):
    out = [sched.get_lr()[0]]
    for _ in range(n):
        sched.step()
        out.append(sched.get_lr()[0])
    return out


def test_warmup_lr_log_and_linear():
    s = WarmupLR(_opt(), warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="log")
    lrs = _lrs(s, 12)
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(math.log(5) / math.log(10))
    assert lrs[10:] == [1.0, 1.0, 1.0]
    s = WarmupLR(_opt(), warmup_min_lr=0.1, warmup_max_lr=0.5, warmup_num_steps=4, warmup_type="linear")
    assert _lrs(s, 5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])


def test_warmup_decay_reaches_zero_at_total_steps():
    s = WarmupDecayLR(_opt(), total_num_steps=10, warmup_max_lr=1.0, warmup_num_steps=2, warmup_type="linear")
    lrs = _lrs(s, 11)
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[6] == pytest.approx(0.5) and lrs[10] == 0.0 and lrs[11] == 0.0


def test_warmup_cosine_scales_the_optimizer_lr():
    s = WarmupCosineLR(_opt(lr=2.0), total_num_steps=12, warmup_num_steps=2, warmup_min_ratio=0.5,
                       cos_min_ratio=0.1, warmup_type="linear")
    lrs = _lrs(s, 12)
    assert lrs[:3] == pytest.approx([1.0, 1.5, 2.0])
    assert lrs[7] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert lrs[12] == pytest.approx(0.2)


def test_one_cycle_lr_and_momentum_move_opposite():
    opt = _opt(cls=torch.optim.SGD, momentum=0.9)
    s = OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4, cycle_min_mom=0.8,
                 cycle_max_mom=0.9, decay_lr_rate=1.0, decay_step_size=2)
    lrs, moms = [s.get_lr()[0]], [opt.param_groups[0]["momentum"]]
    for _ in range(12):
        s.step()
        lrs.append(s.get_lr()[0])
        moms.append(opt.param_groups[0]["momentum"])
    assert lrs[:9] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0, 0.775, 0.55, 0.325, 0.1])
    assert moms[4] == pytest.approx(0.8) and moms[0] == pytest.approx(0.9)
    assert lrs[10] == pytest.approx(0.1 / 2)  # decay: min / (1 + rate * 2/2)
    adam = _opt()
    OneCycle(adam, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=2).step()
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.85)


def test_lr_range_test_continuous_and_staircase():
    s = LRRangeTest(_opt(), lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_step_rate=1.0)
    assert _lrs(s, 4) == pytest.approx([0.01, 0.015, 0.02, 0.025, 0.03])
    s = LRRangeTest(_opt(), lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_staircase=True)
    assert _lrs(s, 4) == pytest.approx([0.01, 0.01, 0.02, 0.02, 0.03])


@pytest.mark.parametrize("cfg", [
    {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
    {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 5}},
    {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 5}},
    {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 3}},
    {"type": "LRRangeTest", "params": {"lr_range_test_step_size": 3}},
])
def test_state_dict_round_trip_resumes_exactly(cfg):
    sc = load_config({"scheduler": cfg}).scheduler
    a = build_scheduler(sc, _opt())
    for _ in range(7):
        a.step()
    b_opt = _opt()
    b = build_scheduler(sc, b_opt)
    b.load_state_dict(a.state_dict())
    assert b.get_lr() == a.get_lr() == [g["lr"] for g in b_opt.param_groups]
    a.step()
    b.step()
    assert b.get_lr() == a.get_lr()


def test_unknown_scheduler_lists_the_supported_ones():
    with pytest.raises(ConfigError) as e:
        build_scheduler(load_config({"scheduler": {"type": "WarmupLr2"}}).scheduler, _opt())
    assert str(e.value).startswith("unknown scheduler type 'WarmupLr2' in scheduler.type; supported: WarmupLR, "
                                   "WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest.")


def test_bad_scheduler_params_are_named():
    with pytest.raises(ConfigError, match="scheduler.params.warmup_num_step is not a parameter of WarmupLR.*"
                                          "Did you mean 'warmup_num_steps'"):
        build_scheduler(load_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 3}}}
                                    ).scheduler, _opt())
    with pytest.raises(ConfigError, match="scheduler OneCycle: .*cycle_min_lr"):
        build_scheduler(load_config({"scheduler": {"type": "OneCycle"}}).scheduler, _opt())
