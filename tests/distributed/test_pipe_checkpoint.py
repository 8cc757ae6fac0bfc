"""Pipeline checkpoints are keyed by layer index (checkpoint/layers.py): saved at (P=2, D=2, ZeRO 1)
after 2 steps of the tied-embedding model, they resume at (P=1, D=4, ZeRO 2), (P=4, D=1, ZeRO 0) and in
one process as the plain ``nn.Sequential`` under the ordinary engine, and the next 3 steps equal the run
that never stopped (AdamW moments and clipping make that fail if optimizer state or a layer's values
were lost); ``zero_to_fp32`` of it, and ``save_16bit_model`` at (P=2, D=2), load into the ``nn.Sequential``."""

import os

import torch

from tests.distributed import pipe_workloads as pw
from tests.distributed.harness import run_ranks

GLOBAL_BATCH, LR, WD, CLIP = 16, 1e-2, 0.01, 0.05
SAVE_AT, LAST = 2, 5
# name -> (pipeline stages, ZeRO stage, micro-batch, accumulation) of the 4-rank runs that resume the save
RESUMES = {"P1_D4_zero2": (1, 2, 2, 2), "P4_D1_zero0": (4, 0, 4, 4)}


def _config(stage: int, micro: int, gas: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
            "train_batch_size": GLOBAL_BATCH, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}}


def _pipe_engine(stages: int, zero: int, micro: int, gas: int):
    import shardspeed
    from shardspeed.pipe import PipelineModule

    module = PipelineModule(pw.layers(), num_stages=stages, loss_fn=pw.loss_fn, partition_method="uniform")
    module.load_global_state_dict(pw.reference_model().state_dict())
    return shardspeed.initialize(model=module, config=_config(zero, micro, gas))[0]


def _train(engine, first: int, last: int) -> None:
    micro, gas, dp = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), \
        engine.topo.dp_world_size
    for step in range(first, last):
        engine.train_batch(iter(pw.micro_batches(step, engine.topo.dp_rank, dp, micro, gas)))


def _state(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.global_state_dict().items()}


def _four_ranks(rank, ckpt):
    from shardspeed import comm

    comm.init_distributed()
    engine = _pipe_engine(2, 1, 2, 4)
    _train(engine, 0, SAVE_AT)
    engine.save_checkpoint(ckpt)
    engine.save_16bit_model(os.path.join(ckpt, "16bit"))  # every stage's layers, in one file
    out = {"saved": _state(engine)}
    _train(engine, SAVE_AT, LAST)
    out["straight"] = _state(engine)
    for name, (stages, zero, micro, gas) in RESUMES.items():
        comm.destroy_model_parallel()  # the next layout builds its own model-parallel unit
        engine = _pipe_engine(stages, zero, micro, gas)
        engine.load_checkpoint(ckpt)
        assert engine.global_steps == SAVE_AT, (name, engine.global_steps)
        _train(engine, SAVE_AT, LAST)
        out[name] = _state(engine)
    return out


def _sequential(rank, ckpt):
    import shardspeed
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = pw.reference_model(seed=1)  # other initial values: all of them must come from the checkpoint
    consolidated = get_fp32_state_dict_from_zero_checkpoint(ckpt)
    pw.reference_model(seed=2).load_state_dict(consolidated)  # strict: exactly the nn.Sequential's names
    engine = shardspeed.initialize(model=model, config=_config(0, 4, 4))[0]
    engine.load_checkpoint(ckpt)
    for step in range(SAVE_AT, LAST):
        for ids, labels in pw.micro_batches(step, 0, 1, 4, 4):
            engine.backward(pw.loss_fn(engine(ids), labels))
            engine.step()
    return consolidated, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _whole(results: list[dict], key: str) -> dict:
    """Every stage's layer-indexed tensors of one run, from all ranks (data-parallel copies agree)."""
    out = {}
    for r in results:
        out.update(r[key])
    return out


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), (what, k, (got[k] - v).abs().max().item())


def test_pipeline_checkpoint_resumes_at_other_layouts_and_as_nn_sequential(tmp_path):
    ckpt = str(tmp_path)
    runs = run_ranks(_four_ranks, 4, ckpt, timeout=240)
    saved, straight = _whole(runs, "saved"), _whole(runs, "straight")
    assert set(straight) == set(pw.reference_model().state_dict())  # the tie once, as layer 0's weight
    assert not all(torch.equal(saved[k], straight[k]) for k in saved)  # the 3 steps moved the model
    for name in RESUMES:
        _close(_whole(runs, name), straight, name)
    consolidated, single = run_ranks(_sequential, 1, ckpt, timeout=120)[0]
    _close(consolidated, saved, "zero_to_fp32")
    _close(single, straight, "nn.Sequential")
    whole = torch.load(os.path.join(ckpt, "16bit", "pytorch_model.bin"))
    pw.reference_model(seed=2).load_state_dict(whole)  # strict: the nn.Sequential's names, the tie once
    _close(whole, saved, "save_16bit_model")
