"""Optimizer state offloaded to disk (zero/swap_optimizer.py): the same run as without offload, bit
for bit, at ZeRO stages 1-3 with accumulation and clipping; resume from a checkpoint written with
offload; swap files gone when the ranks exit."""

import os

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import ODD, engine_run

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}
STEPS = 10


def _config(stage, offload=None, **zero):
    z = {"stage": stage, "reduce_bucket_size": 700, **zero}
    if offload is not None:
        z["offload_optimizer"] = offload
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "optimizer": ADAMW,
            "gradient_clipping": 0.3, "steps_per_print": None, "zero_optimization": z}


def _nvme(path, **extra):
    return {"device": "nvme", "nvme_path": str(path), **extra}


def _runs(rank, configs, steps):
    """Several engines, one after another, in the same ranks (saves a process start per config)."""
    out = []
    for cfg in configs:
        zero_init = isinstance(cfg, tuple)  # ("zero.Init", config): the model built under zero.Init
        r = engine_run(rank, cfg[1] if zero_init else cfg, steps, ODD, zero_init=zero_init)
        out.append({"params": r["params"], "losses": r["losses"], "memory": r["memory"]})
    return out


def _assert_equal(a, b):
    assert a["losses"] == b["losses"]
    for name, t in b["params"].items():
        assert torch.equal(a["params"][name], t), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_to_disk_and_cpu_equal_the_run_without_bit_for_bit(stage, tmp_path):
    # sub-groups of 300 elements: many sub-groups per rank, so the ring of 3 buffers wraps around
    cpu_params = {"offload_param": {"device": "cpu"}} if stage == 3 else {}
    configs = [_config(stage), _config(stage, {"device": "cpu"}, **cpu_params),
               _config(stage, _nvme(tmp_path, buffer_count=3), sub_group_size=300)]
    ranks = run_ranks(_runs, 2, configs, STEPS)
    for base, cpu, nvme in ranks:
        _assert_equal(cpu, base)
        _assert_equal(nvme, base)
        assert base["memory"]["optimizer_states"] > 0
        assert nvme["memory"]["optimizer_states"] < base["memory"]["optimizer_states"] / 10  # only `step` left
        assert nvme["memory"]["optimizer_states_on_disk"] >= base["memory"]["optimizer_states"]
    assert os.listdir(tmp_path) == []  # the swap files went with the ranks


def test_part_of_the_state_on_disk_and_sgd_with_momentum(tmp_path):
    sgd = {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}
    configs = [_config(2), _config(2, _nvme(tmp_path, ratio=0.5), sub_group_size=200),
               {**_config(2), "optimizer": sgd}, {**_config(2, _nvme(tmp_path), sub_group_size=200), "optimizer": sgd}]
    for base, half, sgd_base, sgd_nvme in run_ranks(_runs, 2, configs, 4):
        _assert_equal(half, base)
        _assert_equal(sgd_nvme, sgd_base)
        assert 0 < half["memory"]["optimizer_states"] < base["memory"]["optimizer_states"]


def _resume(rank, stage, path, ckpt):
    """4 steps, save, 3 more; then a new engine loads the checkpoint and runs the same 3 steps."""
    import shardspeed
    from tests.distributed.workloads import micro_slices, model_config, tiny_gpt

    def train(engine, steps):
        losses = []
        for step in steps:
            for x, y in micro_slices(step, engine.topo.dp_rank, 2, 2, 2, model_config(**ODD)):
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
        return losses

    params_too = {"offload_param": _nvme(path), "stage3_param_persistence_threshold": 0} if stage == 3 else {}
    cfg = _config(stage, _nvme(path), sub_group_size=250, **params_too)
    first, *_ = shardspeed.initialize(model=tiny_gpt(**ODD), config=cfg)
    train(first, range(4))
    first.save_checkpoint(str(ckpt))
    at_save = {n: p.detach().clone() for n, p in first.module.state_dict().items()}
    tail = train(first, range(4, 7))
    params = {n: p.detach().clone() for n, p in first.module.state_dict().items()}
    first.optimizer_swapper.close()
    second, *_ = shardspeed.initialize(model=tiny_gpt(seed=1, **ODD), config=cfg)
    second.load_checkpoint(str(ckpt))
    again = train(second, range(4, 7))
    resumed = {n: p.detach().clone() for n, p in second.module.state_dict().items()}
    return tail, again, params, resumed, at_save


def _reshard(rank, path, ckpt):
    """The 2-rank checkpoint loaded at 1 rank, stage 1, optimizer state on disk."""
    import shardspeed
    from tests.distributed.workloads import tiny_gpt

    engine, *_ = shardspeed.initialize(model=tiny_gpt(seed=2, **ODD), config=_config(1, _nvme(path)))
    engine.load_checkpoint(str(ckpt))
    with engine.optimizer_swapper.all_resident():
        state = [v.clone() for st in engine.optimizer.state.values() for v in st.values() if v.numel() > 1]
    return {n: p.detach().clone() for n, p in engine.module.state_dict().items()}, state


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_checkpoint_written_with_offload(stage, tmp_path):
    swap, ckpt = tmp_path / "swap", tmp_path / "ckpt"
    swap.mkdir()
    for tail, again, params, resumed, _ in (ranks := run_ranks(_resume, 2, stage, swap, ckpt)):
        assert again == tail
        for name, t in params.items():
            assert torch.equal(resumed[name], t), name
    if stage == 3:  # and at another world size and stage, as any checkpoint
        values, state = run_ranks(_reshard, 1, swap, ckpt)[0]
        for name, t in ranks[0][4].items():
            assert torch.equal(values[name], t), name
        assert state and all(s.abs().sum() > 0 for s in state)  # AdamW's moments came along
    assert os.listdir(swap) == []


@pytest.mark.parametrize("stage", [1, 3])  # stage 2 publishes as stage 1 does (sharded.py)
def test_bf16_masters_and_state_on_disk_equal_the_run_without(stage, tmp_path):
    # bf16 training keeps fp32 masters apart from the parameters: they go to disk with the state and
    # are published into the bf16 parameters right after their sub-group steps
    bf16 = {"bf16": {"enabled": True}}
    configs = [{**_config(stage), **bf16}, {**_config(stage, _nvme(tmp_path), sub_group_size=300), **bf16}]
    for base, nvme in run_ranks(_runs, 2, configs, 4):
        _assert_equal(nvme, base)
        assert base["memory"]["master_parameters"] > 0 and nvme["memory"]["master_parameters"] == 0


def test_parameter_shards_on_disk_equal_the_run_without(tmp_path):
    # a persistence threshold of 0 puts every unit's shard on disk; 2 buffers make read-ahead,
    # demand reads and reclaimed buffers all happen
    z3 = {"stage3_param_persistence_threshold": 0}
    params = _nvme(tmp_path, buffer_count=2)
    configs = [_config(3, **z3), _config(3, offload_param=params, **z3),
               ("zero.Init", _config(3, _nvme(tmp_path, buffer_count=3), offload_param=params, sub_group_size=300,
                                     **z3))]
    for base, par, both in run_ranks(_runs, 2, configs, STEPS):
        _assert_equal(par, base)
        _assert_equal(both, base)
        assert par["memory"]["parameters"] == 0 and par["memory"]["parameters_on_disk"] > 0
        assert par["memory"]["master_parameters"] > 0  # the masters stay in memory without offload_optimizer
        assert both["memory"]["master_parameters"] == 0 and both["memory"]["optimizer_states_on_disk"] > 0
    assert os.listdir(tmp_path) == []


def _master_storage(rank, path):
    """Per config: (bytes of fp32 masters the optimizer steps, bytes of distinct storages still
    reachable from them, the master bytes the engine counts), right after initialize()."""
    import gc

    import shardspeed
    from tests.distributed.workloads import tiny_gpt

    both = {"offload_param": _nvme(path), "stage3_param_persistence_threshold": 0}
    bf16 = {"bf16": {"enabled": True}}
    configs = [_config(3, _nvme(path), **both), {**_config(3, _nvme(path)), **bf16},
               {**_config(1, _nvme(path)), **bf16}]
    out = []
    for cfg in configs:
        engine, optimizer, *_ = shardspeed.initialize(model=tiny_gpt(**ODD), config=cfg)
        gc.collect()
        masters = [p for g in optimizer.param_groups for p in g["params"]]
        seen, live = set(), 0
        for m in masters:
            for t in (m, m._base):  # a view keeps its base's storage alive whatever its own .data is
                if t is not None and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    live += t.untyped_storage().nbytes()
        out.append((4 * sum(m.numel() for m in masters), live, engine.memory_breakdown()["master_parameters"]))
        del engine, optimizer
    return out


def test_masters_taken_by_the_tier_leave_no_storage_behind(tmp_path):
    # stage 3 with a separate master (bf16, or fp32 with the shards on disk) once kept each unit's
    # whole fp32 master alive behind the chunk views the tier emptied: 4 bytes per shard element
    # resident and counted as 0 (Note: master chunks own their storage)
    for rank in run_ranks(_master_storage, 2, tmp_path):
        for expected, live, counted in rank:
            assert expected > 10_000 and counted == 0
            assert live < expected / 100, (expected, live)  # the shared one-element placeholders only
    assert os.listdir(tmp_path) == []


def _refusals(rank, path):
    import collections
    import logging
    from unittest import mock

    import shardspeed
    from shardspeed.config import ConfigError
    from tests.distributed.workloads import tiny_gpt

    lamb = {"type": "Lamb", "params": {"lr": 1e-2}}
    cases = [
        _config(2, _nvme(path / "missing")),
        _config(3, offload_param={**_nvme(path), "buffer_size": 100}, stage3_param_persistence_threshold=0),
        {**_config(2, _nvme(path)), "optimizer": lamb},
    ]
    out = []
    for cfg in cases:
        try:
            shardspeed.initialize(model=tiny_gpt(**ODD), config=cfg)
            out.append("no error")
        except ConfigError as e:
            out.append(str(e))
    # a disk with 4 KiB free: refused at initialize(), before any step, with the bytes needed
    usage = collections.namedtuple("usage", "total used free")
    with mock.patch("shardspeed.zero.swap_io.shutil.disk_usage", return_value=usage(2**40, 2**40 - 4096, 4096)):
        try:
            shardspeed.initialize(model=tiny_gpt(**ODD), config=_config(2, _nvme(path)))
            out.append("no error")
        except ConfigError as e:
            out.append(str(e))
    # device cpu on a CPU run: said once, nothing moves
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("shardspeed").addHandler(handler)
    engine, *_ = shardspeed.initialize(model=tiny_gpt(**ODD), config=_config(3, {"device": "cpu"},
                                                                            offload_param={"device": "cpu"}))
    out.append([r.getMessage() for r in records if "'cpu'" in r.getMessage()])
    out.append(engine.optimizer_swapper is None and engine.strategy.param_tier is None)
    return out


def test_engine_refusals_name_the_key_and_the_number(tmp_path):
    missing, small, lamb, full, cpu_lines, nothing_moved = run_ranks(_refusals, 1, tmp_path)[0]
    key = "zero_optimization.offload_optimizer"
    assert missing.startswith(f"{key}.nvme_path '{tmp_path / 'missing'}' does not exist")
    assert small.startswith("zero_optimization.offload_param.buffer_size 100 is smaller than the largest shard this "
                            "rank reads at once: ")
    assert "elements (the unit holding '" in small and "set it to" in small
    assert lamb.startswith(f"{key}.device 'nvme' steps the optimizer one sub-group at a time; FusedLamb reduces norms")
    assert full.startswith(f"{key}.nvme_path '{tmp_path}' has 4096 bytes free (0.00 GiB) but the optimizer state "
                           "(2 fp32 values per element, all ranks; this rank ")
    assert " bytes) needs " in full and "point zero_optimization.offload_optimizer.nvme_path at a larger disk" in full
    assert cpu_lines == [
        "zero_optimization.offload_param.device 'cpu': training runs on the CPU, so the parameter shards are already "
        "in host memory; nothing moves",
        "zero_optimization.offload_optimizer.device 'cpu': training runs on the CPU, so the optimizer state is already "
        "in host memory; nothing moves"]
    assert nothing_moved
    assert os.listdir(tmp_path) == []


def test_optimizer_in_backward_with_state_and_shards_on_disk_equals_the_run_without(tmp_path):
    # each unit's state is read, stepped and written back as its gradients are reduced, in backward
    z = {"optimizer_in_backward": True, "stage3_param_persistence_threshold": 0}
    plain = {"gradient_clipping": 0.0, "train_batch_size": 4}  # what a step in backward allows
    configs = [{**_config(3, **z), **plain}, {**_config(3, _nvme(tmp_path, buffer_count=2), **z), **plain},
               {**_config(3, _nvme(tmp_path), offload_param=_nvme(tmp_path), **z), **plain}]
    for base, state, both in run_ranks(_runs, 2, configs, STEPS):
        _assert_equal(state, base)
        _assert_equal(both, base)
        assert state["memory"]["optimizer_states_on_disk"] > 0 and both["memory"]["parameters_on_disk"] > 0
    assert os.listdir(tmp_path) == []


def _overlap(rank, path):
    """When the state's reads and writes happen against the step (Note: the ring)."""
    import shardspeed
    from tests.distributed.workloads import micro_slices, model_config, tiny_gpt

    cfg = _config(2, _nvme(path, buffer_count=3), sub_group_size=300)
    engine = shardspeed.initialize(model=tiny_gpt(**ODD), config=cfg)[0]
    swapper = engine.optimizer_swapper
    io = {"read": 0, "write": 0}
    for kind in io:
        real = getattr(swapper.file, kind)

        def counted(*a, _real=real, _kind=kind, **k):
            io[_kind] += 1
            return _real(*a, **k)
        setattr(swapper.file, kind, counted)
    groups = sum(g.on_tier for g in swapper.subgroups)
    seen = []
    for step in range(2):
        for i, (ids, labels) in enumerate(micro_slices(step, rank, 1, 2, 4, model_config(**ODD))):
            loss = engine(ids, labels)
            before = dict(io)
            engine.backward(loss)
            seen.append((i, io["read"] - before["read"]))  # reads started by this backward
            before = dict(io)
            engine.step()
        # after the step: write-backs of the last sub-groups still in flight (waited for later)
        seen.append(("pending writes", len(swapper._writes), "step reads", io["read"] - before["read"]))
    return groups, seen


def test_state_reads_start_in_backward_and_writes_finish_in_the_next_forward(tmp_path):
    groups, seen = run_ranks(_overlap, 1, tmp_path)[0]
    assert groups >= 4, groups  # more sub-groups than the ring of 3 holds
    # step 1 created the state (nothing to read); from step 2 on, the boundary backward (micro-batch
    # 3 of 4) starts the first R - 1 = 2 reads, the others' backwards none, and the step the rest
    assert seen[:4] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert seen[5:9] == [(0, 0), (1, 0), (2, 0), (3, 2)], seen
    assert seen[9][1] >= 1 and seen[9][3] == groups - 2, seen
