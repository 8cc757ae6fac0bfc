"""The memory planner (zero/planner): its arithmetic against figures worked out by hand from the
strategies' rules, the ``shardspeed-plan`` command's output and errors, and the estimators'
DeepSpeed signatures."""

import inspect
import json

import pytest
import torch

import shardspeed.zero as zero
from shardspeed.config import ConfigError
from shardspeed.zero.planner import load_plan_config, make_plan, settings_from_config, spec_from_count, spec_from_module
from shardspeed.zero.planner.cli import main, parse_count
from shardspeed.zero.planner.offload import file_bytes, on_tier, region_bytes, ring_bytes, sub_groups
from shardspeed.zero.planner.windows import gathered_peak, prefetch_budget, reduction_peak

ADAMW = {"type": "AdamW", "params": {"lr": 1e-3}}


def _mlp(layers=4, width=100):
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _plan(stage, world=2, model=None, **zero_opts):
    cfg, off = load_plan_config({"train_batch_size": 2 * world, "optimizer": ADAMW,
                                 "zero_optimization": {"stage": stage, **zero_opts}})
    s = settings_from_config(cfg, world, offload=off)
    return make_plan(spec_from_module(model or _mlp(), s.z3), s)


def _by(plan, group, phase=None):
    return {i.what.split(" (")[0]: i.nbytes for i in plan.items
            if i.group == group and (phase is None or i.phase == phase)}


# -- the rules, replayed on sizes ---------------------------------------------------------------
def test_reduction_peak_retires_the_oldest_before_a_buffer_would_cross_the_bound():
    # 4 buffers of 10 under a bound of 25: two at a time; the retired one is reused from the pool
    r = reduction_peak([10, 10, 10, 10], bound=25, pool_cap=25)
    assert (r.backward, r.in_flight, r.after_backward) == (20, 20, 20)
    # a buffer larger than the bound still goes alone; the pool keeps at most its cap
    assert reduction_peak([30, 10], bound=25, pool_cap=25) == type(r)(30, 30, 10)
    # stage 0: nothing retired early, nothing borrowed
    assert reduction_peak([10, 10, 10], bound=None, pool_cap=None).backward == 30


def test_prefetch_budget_default_is_an_eighth_of_the_model_at_least_the_largest_unit():
    assert prefetch_budget([100] * 8, None) == 100
    assert prefetch_budget([100] * 80, None) == 1000
    assert prefetch_budget([100, 900], None) == 900
    assert prefetch_budget([10**9] * 8, None) == 50_000_000
    assert prefetch_budget([100] * 8, 250) == 250


def test_gathered_peak_is_the_running_unit_and_the_window_ahead():
    sizes = [100] * 6
    assert gathered_peak(sizes, sizes, [False] * 6, 100, 10**9, 100) == (200, 200)
    # a window of 250 elements reaches 3 units ahead (the budget is spent after the unit that crosses it)
    assert gathered_peak(sizes, sizes, [False] * 6, 250, 10**9, 0)[0] == 400
    # max_live caps it: running + one
    assert gathered_peak(sizes, sizes, [False] * 6, 250, 200, 0)[0] == 200
    # persistent units count against max_live but are not gathered anew
    assert gathered_peak(sizes, sizes, [True] + [False] * 5, 100, 10**9, 100) == (200, 200)


# -- plans worked out by hand: 4 x Linear(100, 100), 2 ranks, fp32 AdamW ------------------------
# 10,100 elements per layer. Stages 1-2, reduce_bucket_size 25,000: buckets (reverse order)
# [b3 w3 b2 w2 b1] = 20,300 and [w1 b0 w0] = 20,100 elements, shard 10,150 + 10,050 = 20,200.
def test_stage2_plan_by_hand():
    p = _plan(2, reduce_bucket_size=25_000)
    states = _by(p, "model states")
    assert states == {"parameters": 4 * 40_400, "fp32 masters": 0, "optimizer state": 8 * 20_200,
                      "fp32 gradient shard": 4 * 20_200}
    # one borrowed bucket at a time (two would cross 25,000), autograd's 10,000-element weight gradient
    assert _by(p, "transient", "backward") == {"borrowed gradient buckets": 4 * 20_300,
                                               "autograd's gradient of the largest parameter": 4 * 10_000}
    assert p.largest_transient()[0] == "backward"
    assert p.peak("device") == 4 * 40_400 + 12 * 20_200 + 4 * 20_300 + 4 * 10_000 == 525_200
    assert p.peak("disk") == 0


def test_stage1_keeps_full_gradient_buckets_and_no_borrowed_ones():
    p = _plan(1, reduce_bucket_size=25_000)
    assert _by(p, "model states")["gradient buckets"] == 4 * 40_400
    assert _by(p, "transient") == {"autograd's gradient of the largest parameter": 40_000}
    assert p.peak("device") == 4 * 40_400 * 2 + 8 * 20_200 + 40_000


def test_stage0_and_bf16_masters():
    p = _plan(0)
    assert p.steady("device") == 16 * 40_400
    cfg, off = load_plan_config({"train_batch_size": 4, "optimizer": ADAMW, "bf16": {"enabled": True},
                                 "zero_optimization": {"stage": 2}})
    bf = make_plan(spec_from_module(_mlp()), settings_from_config(cfg, 2, offload=off))
    states = _by(bf, "model states")
    assert states["parameters"] == 2 * 40_400 and states["fp32 masters"] == 4 * 20_200


# Stage 3, persistence 0: 4 units of 10,100 (shard 5,050); window = one unit ahead; kept for backward:
# the last two units; gradient buffers: two fit under 25,000.
def test_stage3_plan_by_hand():
    p = _plan(3, reduce_bucket_size=25_000, stage3_param_persistence_threshold=0)
    assert sum(_by(p, "model states").values()) == (4 + 8 + 4) * 20_200
    assert _by(p, "transient", "backward") == {
        "gathered units": 4 * 20_200, "unit gradient buffers": 4 * 20_200,
        "autograd's gradient of the largest parameter": 4 * 10_000}
    assert _by(p, "transient", "forward") == {"gathered units": 4 * 20_200}
    assert p.peak("device") == 16 * 20_200 + 4 * 20_200 + 4 * 20_200 + 40_000 == 524_800
    # initialize() without zero.Init holds the whole fp32 model beside the new shards
    assert p.init_peak("device") == 4 * 40_400 + 8 * 20_200


def test_stage3_small_units_stay_gathered():
    p = _plan(3)  # default threshold 100,000 > 10,100: every unit persists
    assert _by(p, "buffers") == {"small units kept gathered": 4 * 40_400}
    assert _by(p, "transient", "backward").get("gathered units", 0) == 0


def test_parameter_count_alone_assumes_eight_layers():
    spec = spec_from_count(1000)
    assert [p.numel for p in spec.params] == [125] * 8 and "assumed" in spec.assumed
    assert [p.numel for p in spec_from_count(1000, 300).params] == [300, 300, 300, 100]
    with pytest.raises(ValueError, match="largest layer"):
        spec_from_count(1000, 2000)


# -- offload ------------------------------------------------------------------------------------
def test_sub_groups_ratio_and_ring_follow_the_swapper():
    assert sub_groups([[5], [5], [20], [3]], 10) == [[5, 5], [20], [3]]
    assert sub_groups([[2, 3], [4, 1], [6]], 0) == [[2, 3], [4, 1], [6]]  # optimizer in backward: a unit each
    assert on_tier([[5, 5], [20], [3]], 0.5) == [True, False, False]
    assert on_tier([[5, 5], [20], [3]], 1.0) == [True, True, True]
    assert region_bytes([1000], 2) == 8192  # 2 states x 4000 B, aligned to 4096
    assert file_bytes([1000], 2, masters=True) == 12288  # masters written first reserve room for the state
    assert ring_bytes([8192, 4096, 4096], 1) == 8192 + 4096  # at least 2 buffers; buffer 0 saw 8192 then 4096


def test_optimizer_on_disk_moves_state_and_adds_the_ring(tmp_path):
    p = _plan(2, reduce_bucket_size=25_000,
              offload_optimizer={"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 2},
              sub_group_size=10_150)
    # masters 10,150 and 10,050 elements: two sub-groups, each region 2 x 4 B x n aligned
    regions = [region_bytes([10_150], 2), region_bytes([10_050], 2)]
    assert p.peak("disk") == sum(regions)
    assert _by(p, "buffers") == {"optimizer ring": sum(regions)}
    assert p.steady("device") == 4 * 40_400 + 4 * 20_200 + sum(regions)  # no optimizer state in memory


def test_cpu_offload_on_a_cpu_device_changes_nothing():
    base = _plan(2)
    off = _plan(2, offload_optimizer={"device": "cpu"})
    assert off.peak("device") == base.peak("device") and off.peak("host") == 0
    assert any("device is the CPU" in n for n in off.notes)


def test_offload_where_it_does_not_apply_names_the_key():
    with pytest.raises((ValueError, ConfigError), match="offload_param"):
        _plan(2, offload_param={"device": "cpu"})


# -- the command --------------------------------------------------------------------------------
def _config(tmp_path, **zero_opts):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 4, "optimizer": ADAMW, "zero_optimization": zero_opts}))
    return str(path)


def test_command_prints_states_buffers_transient_and_the_fit(tmp_path, capsys):
    rc = main(["--config", _config(tmp_path, stage=3), "--params", "50M", "--ranks", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ("model states", "buffers", "largest transient (backward)", "peak of a step", "initialize()",
                   "this machine:", "fits", "assumed: parameters / 8"):
        assert needle in out
    assert "device" in out.splitlines()[2] and "disk" in out.splitlines()[2]


def test_command_says_when_it_does_not_fit(tmp_path, capsys):
    assert main(["--config", _config(tmp_path, stage=0), "--params", "1T"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_command_json_and_model_factory(tmp_path, capsys):
    rc = main(["--config", _config(tmp_path, stage=2), "--model", "tests.unit.test_planner:_mlp", "--ranks", "2",
               "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["params"] == 40_400 and data["stage"] == 2 and data["peak"]["device"] > 0


def test_command_checks_the_disk_at_nvme_path(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    cfg = _config(tmp_path, stage=2, offload_optimizer={"device": "nvme", "nvme_path": missing})
    assert main(["--config", cfg, "--params", "10M"]) == 1
    assert f"nvme_path '{missing}': it does not exist" in capsys.readouterr().out
    cfg = _config(tmp_path, stage=2, offload_optimizer={"device": "nvme", "nvme_path": str(tmp_path)})
    assert main(["--config", cfg, "--params", "10M", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "optimizer ring" in out and f"disk at nvme_path '{tmp_path}': 2 rank(s) x 38.15 MiB" in out


@pytest.mark.parametrize("argv, message", [
    (["--params", "10M"], "--config"),
    (["--config", "x.json"], "one of the arguments --params --model is required"),
    (["--config", "x.json", "--params", "ten"], "is not a parameter count"),
])
def test_command_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_command_config_errors_name_the_file_and_key(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.json"), "--params", "1M"]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}}))
    assert main(["--config", str(bad), "--params", "1M"]) == 2
    err = capsys.readouterr().err
    assert "zero_optimization.reduce_bucket_sise" in err and "reduce_bucket_size" in err
    assert main(["--config", _config(tmp_path, stage=2), "--model", "tests.unit.test_planner:nothing"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert main(["--config", _config(tmp_path, stage=2), "--params", "1M", "--ranks", "3", "--nodes", "2"]) == 2
    assert "split evenly" in capsys.readouterr().err


def test_parse_count():
    assert [parse_count(t) for t in ("50000000", "5e7", "350M", "1.3B", "2k")] == [
        50_000_000, 50_000_000, 350_000_000, 1_300_000_000, 2000]


# -- DeepSpeed's names and arguments ------------------------------------------------------------
DEEPSPEED_SIGNATURES = {  # deepspeed 0.19.8, inspect.signature
    "estimate_zero2_model_states_mem_needs": [("total_params", None), ("num_gpus_per_node", 1), ("num_nodes", 1),
                                              ("cpu_offload", True), ("additional_buffer_factor", 1.5)],
    "estimate_zero2_model_states_mem_needs_all_live": [("model", None), ("num_gpus_per_node", 1), ("num_nodes", 1),
                                                       ("additional_buffer_factor", 1.5)],
    "estimate_zero2_model_states_mem_needs_all_cold": [("total_params", None), ("num_gpus_per_node", 1),
                                                       ("num_nodes", 1), ("additional_buffer_factor", 1.5)],
    "estimate_zero3_model_states_mem_needs": [("total_params", None), ("largest_layer_params", None),
                                              ("num_gpus_per_node", 1), ("num_nodes", 1), ("cpu_offload", True),
                                              ("cpu_offload_params", True), ("zero_init", True),
                                              ("additional_buffer_factor", 1.5)],
    "estimate_zero3_model_states_mem_needs_all_live": [("model", None), ("num_gpus_per_node", 1), ("num_nodes", 1),
                                                       ("additional_buffer_factor", 1.5)],
    "estimate_zero3_model_states_mem_needs_all_cold": [("total_params", None), ("largest_layer_params", None),
                                                       ("num_gpus_per_node", 1), ("num_nodes", 1),
                                                       ("additional_buffer_factor", 1.5)],
}


@pytest.mark.parametrize("name", sorted(DEEPSPEED_SIGNATURES))
def test_estimators_take_deepspeeds_positional_arguments(name):
    params = [p for p in inspect.signature(getattr(zero, name)).parameters.values()
              if p.kind == p.POSITIONAL_OR_KEYWORD]
    got = [(p.name, None if p.default is p.empty else p.default) for p in params]
    assert got == DEEPSPEED_SIGNATURES[name]


def test_estimators_print_a_table_and_return_bytes(capsys):
    zero.estimate_zero3_model_states_mem_needs_all_live(_mlp(), num_gpus_per_node=2)
    out = capsys.readouterr().out
    assert "host/node | device/rank | options" in out
    assert out.count("zero_init=") == 6
    host, dev = zero.estimate_zero2_model_states_mem_needs(40_400, 2, 1, cpu_offload=False, compute_dtype="fp32",
                                                           largest_layer_params=10_100)
    assert dev > 0 and host == int(4 * 40_400 * 2 * 1.5)  # the fp32 model loaded on the host by each rank
    host3, dev3, largest = zero.estimate_zero3_model_states_mem_needs(40_400, 10_100, 2, compute_dtype="fp32")
    assert largest == 4 * 10_100 and dev3 < dev  # parameters and optimizer state on the host
    with pytest.raises(ValueError, match="cpu_offload_params=True needs cpu_offload=True"):
        zero.estimate_zero3_model_states_mem_needs(40_400, 10_100, cpu_offload=False)


def test_initialize_writes_each_shard_out_as_its_unit_is_built(tmp_path):
    cfg, off = load_plan_config({"train_batch_size": 4, "optimizer": ADAMW, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "optimizer_in_backward": True,
        "offload_param": {"device": "nvme", "nvme_path": str(tmp_path), "buffer_size": 5_050}}})
    p = make_plan(spec_from_module(_mlp()), settings_from_config(cfg, 2, zero_init=True, offload=off))
    # zero.Init: one 10,000-element weight gathered whole; every unit's fp32 master copy; each shard is
    # written out as its unit is built (one 5,050-element shard and its 4 KiB-aligned write buffer)
    assert p.init_peak("device") == 4 * 10_000 + 4 * 20_200 + 2 * 20_480
    # at rest the shards are on disk (4 units x 5,050 fp32, 4 KiB-aligned) and the masters in memory
    assert p.peak("disk") == 4 * 20_480
    assert p.total("model states", "device") == 4 * 20_200 + 8 * 20_200  # masters, optimizer state
    with pytest.raises(ValueError, match="buffer_size 5000 is smaller than the largest shard"):
        cfg.zero_optimization.offload_param.buffer_size = 5_000
        make_plan(spec_from_module(_mlp()), settings_from_config(cfg, 2, offload=load_plan_config(cfg)[1]))


@pytest.mark.parametrize("optimizer, state, temp", [
    ({"type": "AdamW", "params": {"lr": 1}}, 8, 0),  # torch's fused kernel: no temporaries
    ({"type": "Adam", "params": {"lr": 1, "bias_correction": False}}, 8, 4),  # our foreach step keeps sqrt(v)
    ({"type": "Adam", "params": {"lr": 1, "amsgrad": True}}, 12, 4),
    ({"type": "SGD", "params": {"lr": 1, "momentum": 0.9}}, 4, 0),
    ({"type": "SGD", "params": {"lr": 1}}, 0, 0),
    ({"type": "Lamb", "params": {"lr": 1}}, 8, 8),
])
def test_optimizer_state_bytes(optimizer, state, temp):
    from shardspeed.zero.planner.settings import optimizer_kind

    cfg, _ = load_plan_config({"train_batch_size": 2, "optimizer": optimizer})
    kind = optimizer_kind(cfg)
    assert (kind.state_bytes, kind.step_temp_bytes) == (state, temp)
