"""The fp16 loss-scale state machine, step by step."""

from shardspeed.config import load_config
from shardspeed.precision import LossScaler


def test_dynamic_scale_hysteresis_then_halving():
    s = LossScaler(init_scale=2**10, dynamic=True, scale_window=3, hysteresis=2, min_scale=1)
    s.update(overflow=True)  # first overflow spends hysteresis, keeps the scale
    assert s.scale == 2**10 and s.state.hysteresis_left == 1
    s.update(overflow=True)  # second one halves
    assert s.scale == 2**9
    s.update(overflow=True)  # budget stays spent until the scale grows again
    assert s.scale == 2**8


def test_dynamic_scale_grows_after_window_and_refills_hysteresis():
    s = LossScaler(init_scale=8, dynamic=True, scale_window=3, hysteresis=2)
    s.update(True)
    assert s.state.hysteresis_left == 1
    for _ in range(2):
        s.update(False)
    assert s.scale == 8
    s.update(False)
    assert s.scale == 16 and s.state.hysteresis_left == 2 and s.state.clean_steps == 0
    for _ in range(3):
        s.update(False)
    assert s.scale == 32


def test_overflow_restarts_the_window():
    s = LossScaler(init_scale=8, dynamic=True, scale_window=2, hysteresis=1)
    s.update(False)
    s.update(True)  # halves, window restarts
    assert s.scale == 4
    s.update(False)
    assert s.scale == 4
    s.update(False)
    assert s.scale == 8


def test_min_scale_is_a_floor():
    s = LossScaler(init_scale=4, dynamic=True, hysteresis=1, min_scale=2)
    for _ in range(5):
        s.update(True)
    assert s.scale == 2


def test_consecutive_hysteresis_refills_after_each_clean_step():
    s = LossScaler(init_scale=8, dynamic=True, scale_window=100, hysteresis=2, consecutive_hysteresis=True)
    s.update(True)
    s.update(False)
    s.update(True)  # not consecutive: budget was refilled, scale kept
    assert s.scale == 8
    s.update(True)
    assert s.scale == 4


def test_static_scale_never_moves():
    s = LossScaler(init_scale=128, dynamic=False)
    for overflow in (True, True, False, False):
        s.update(overflow)
    assert s.scale == 128


def test_from_config_and_state_dict_round_trip():
    dyn = LossScaler.from_config(load_config({"fp16": {"enabled": True, "initial_scale_power": 5,
                                                       "loss_scale_window": 7, "hysteresis": 3}}).fp16)
    assert dyn.dynamic and dyn.scale == 32 and dyn.scale_window == 7 and dyn.state.hysteresis_left == 3
    static = LossScaler.from_config(load_config({"fp16": {"enabled": True, "loss_scale": 64}}).fp16)
    assert not static.dynamic and static.scale == 64
    dyn.update(True)
    other = LossScaler(init_scale=1, dynamic=True, hysteresis=3)
    other.load_state_dict(dyn.state_dict())
    assert other.state == dyn.state
