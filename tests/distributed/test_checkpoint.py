"""Checkpoints: exact resume, any world size and stage in and out, consolidation, damage, crashes."""

import math
import os

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import max_rel_diff, micro_slices, model_config, tiny_gpt

ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}
DROPOUT = {"dropout": 0.1}


def _config(stage, precision=None):
    return {**({precision: {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})}}
               if precision else {}),
            "train_batch_size": 12, "optimizer": ADAMW, "gradient_clipping": 0.5, "steps_per_print": None,
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 3e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100,
                                  "reduce_bucket_size": 3000}}


def _train(engine, first, last, rank, world, dropout=0.1):
    cfg = model_config(dropout=dropout)
    for step in range(first, last):
        for x, y in micro_slices(step, rank, world, engine.train_micro_batch_size_per_gpu(), 1, cfg):
            engine.backward(engine(x, y))
            engine.step()


def _params(engine):
    names = {n for n, _ in engine.module.named_parameters()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items() if k in names}


def _worker(rank, stage, ckpt, mode, resume_until=4, dropout=0.1, precision=None):
    """mode: 'straight' 4 steps; 'save' 2 steps then save then 1 more; 'resume' load then steps 2..4.
    Dropout exercises the RNG restore (same world size only: other sizes draw other masks)."""
    import shardspeed

    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(123)
    engine, *_ = shardspeed.initialize(model=tiny_gpt(dropout=dropout), config=_config(stage, precision))
    out = {}
    if mode == "straight":
        _train(engine, 0, 4, rank, world, dropout)
    elif mode == "save":
        _train(engine, 0, 2, rank, world, dropout)
        engine.save_checkpoint(ckpt, client_state={"note": "hi"})
        out["saved"] = _params(engine)
        _train(engine, 2, 3, rank, world, dropout)
    elif mode == "resume":
        path, client = engine.load_checkpoint(ckpt)
        out["client"], out["loaded"], out["global_steps"] = client, _params(engine), engine.global_steps
        out["lr"] = engine.get_lr()
        _train(engine, 2, resume_until, rank, world, dropout)
    out["params"], out["loss_scale"] = _params(engine), engine.loss_scale
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exact_resume_bit_for_bit(tmp_path, stage):
    straight = run_ranks(_worker, 2, stage, str(tmp_path), "straight")
    run_ranks(_worker, 2, stage, str(tmp_path), "save")
    resumed = run_ranks(_worker, 2, stage, str(tmp_path), "resume")
    assert resumed[0]["client"] == {"note": "hi"} and resumed[0]["global_steps"] == 2
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert (tmp_path / "latest").read_text() == "global_step2"


def test_exact_resume_on_three_ranks(tmp_path):
    straight = run_ranks(_worker, 3, 2, str(tmp_path), "straight")
    run_ranks(_worker, 3, 2, str(tmp_path), "save")
    resumed = run_ranks(_worker, 3, 2, str(tmp_path), "resume")
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_exact_resume_mixed_precision(tmp_path, stage, precision):
    straight = run_ranks(_worker, 2, stage, str(tmp_path), "straight", 4, 0.1, precision)
    run_ranks(_worker, 2, stage, str(tmp_path), "save", 4, 0.1, precision)
    resumed = run_ranks(_worker, 2, stage, str(tmp_path), "resume", 4, 0.1, precision)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        assert a["loss_scale"] == b["loss_scale"]


@pytest.mark.parametrize("src, dst", [((2, 3), (3, 1)), ((2, 1), (3, 3)), ((3, 2), (2, 0))])
def test_reshard_world_size_and_stage(tmp_path, src, dst):
    (w_src, s_src), (w_dst, s_dst) = src, dst
    saved = run_ranks(_worker, w_src, s_src, str(tmp_path), "save", 4, 0.0)
    loaded = run_ranks(_worker, w_dst, s_dst, str(tmp_path), "resume", 3, 0.0)
    for r in loaded:
        assert max_rel_diff(r["loaded"], saved[0]["saved"]) == 0.0  # the same parameters, exactly
        assert r["lr"] == pytest.approx([3e-3 * math.log(3) / math.log(5)])  # the schedule resumed at step 2
        # one more step with the loaded optimizer state matches the run that never stopped
        assert max_rel_diff(r["params"], saved[0]["params"]) < 1e-5


def test_single_process_loads_and_consolidates(tmp_path):
    import shardspeed
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, main

    saved = run_ranks(_worker, 2, 3, str(tmp_path), "save")
    engine, *_ = shardspeed.initialize(model=tiny_gpt(**DROPOUT), config=_config(0))
    engine.load_checkpoint(str(tmp_path))
    assert max_rel_diff(_params(engine), saved[0]["saved"]) == 0.0
    sd = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    assert max_rel_diff({k: sd[k] for k in saved[0]["saved"]}, saved[0]["saved"]) == 0.0
    assert main([str(tmp_path), str(tmp_path / "model.bin")]) == 0
    plain = tiny_gpt(**DROPOUT)
    plain.load_state_dict(torch.load(tmp_path / "model.bin", weights_only=True))
    assert main([str(tmp_path), str(tmp_path / "model.safetensors"), "--safetensors", "--max_shard_size", "20000"]) == 0
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1 and (tmp_path / "model.index.json").is_file()


def _load_only(rank, ckpt):
    import shardspeed

    engine, *_ = shardspeed.initialize(model=tiny_gpt(**DROPOUT), config=_config(2))
    try:
        engine.load_checkpoint(ckpt)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def test_damaged_and_missing_files_are_named_on_every_rank(tmp_path):
    run_ranks(_worker, 2, 2, str(tmp_path), "save")
    shard = tmp_path / "global_step2" / "rank_1.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    for msg in run_ranks(_load_only, 2, str(tmp_path)):
        assert msg.startswith("CheckpointError: checkpoint file") and f"{shard} is damaged" in msg
    shard.unlink()
    for msg in run_ranks(_load_only, 2, str(tmp_path)):
        assert f"checkpoint file {shard} is missing" in msg


def _crash_in_second_save(rank, ckpt):
    import shardspeed
    from shardspeed.checkpoint import files

    engine, *_ = shardspeed.initialize(model=tiny_gpt(**DROPOUT), config=_config(1))
    _train(engine, 0, 1, rank, 2)
    engine.save_checkpoint(ckpt, tag="good")
    _train(engine, 1, 2, rank, 2)
    if rank == 1:
        real = files.atomic_save

        def dying(obj, path):
            real(obj, path)
            os._exit(9)  # killed right after writing its shard, before the checkpoint is complete

        files.atomic_save = dying
    engine.save_checkpoint(ckpt, tag="bad")


def test_rank_killed_mid_save_leaves_last_good_checkpoint(tmp_path):
    import shardspeed

    with pytest.raises((RuntimeError, AssertionError), match="died|failed"):
        run_ranks(_crash_in_second_save, 2, str(tmp_path), timeout=60,
                  extra_env={"SHARDSPEED_COMM_TIMEOUT_S": "10"})
    assert (tmp_path / "latest").read_text() == "good" and not (tmp_path / "bad").exists()
    engine, *_ = shardspeed.initialize(model=tiny_gpt(**DROPOUT), config=_config(0))
    path, _ = engine.load_checkpoint(str(tmp_path))
    assert path.endswith("good") and engine.global_steps == 1


def _save_on_rank0_only(rank, ckpt):
    import time

    import shardspeed

    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config=_config(0))
    if rank == 0:
        try:
            engine.save_checkpoint(ckpt)
        except RuntimeError as e:
            return str(e)
    else:
        time.sleep(6)
    return ""


def test_save_called_by_some_ranks_only_fails_clearly(tmp_path):
    msg = run_ranks(_save_on_rank0_only, 2, str(tmp_path), extra_env={"SHARDSPEED_CHECKPOINT_TIMEOUT_S": "2"})[0]
    assert "save_checkpoint(tag='global_step0') must be called by every rank" in msg and "1" in msg
