"""AutoTP on real ranks: Hugging Face GPT-2, Llama and BERT built from a config, sliced by
``"tensor_parallel": {"autotp_size": 2}`` over 4 ranks (T = 2 x D = 2) through ``shardspeed.initialize``
and trained as users call them (``engine(input_ids=..., labels=...)``, ``out.loss``) with gradient
accumulation and clipping, equal to single-process PyTorch AdamW on the unsliced model: every
parameter joined back from the tensor-parallel slices (``join_slices``) within 1e-5 relative, and the
global gradient norm each step. Also: a model sliced by ``autotp(model, plan=...)`` before
``initialize()``, which then uses the unit ``initialize_model_parallel`` made; and the refusals.

All cases run in one 4-rank job (starting 4 ranks costs seconds on 2 cores); the tests read its parts.

[Note: Adam's eps in these comparisons]
AdamW's update is about lr·g/(|g| + eps). Slicing reorders the sums inside every matmul, so each
gradient element moves by fp32 rounding, ~3e-7 of the largest term; for an element whose gradient
is near eps (the defaults' 1e-8: GPT-2 has a few among its small initial gradients), that rounding
becomes a different update of size ~lr (measured: 1.5e-3 relative on one GPT-2 weight after 3 steps,
while the gradients agree to 5e-7). eps = 1e-4 keeps each update a smooth function of its gradient,
so the comparison measures the implementation rather than that amplification (worst: 3.6e-6).
"""

import pytest
import torch

from shardspeed.tensor_parallel import join_slices
from tests.distributed.harness import run_ranks
from tests.distributed.hf_models import hf_batch, hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.world_size(4)

T, D, LR, WD, EPS, CLIP, STEPS, MICRO, ACCUM = 2, 2, 3e-3, 0.01, 1e-4, 0.5, 3, 2, 2
BATCH = MICRO * ACCUM * D
# (model, ZeRO stage); ZeRO partitions over the data-parallel group only, stage 3 with every
# parameter partitioned (persistence threshold 0)
CASES = [("gpt2", 0), ("gpt2", 1), ("gpt2", 2), ("gpt2", 3), ("llama", 1), ("llama", 3), ("bert", 1)]
# Llama's plan given explicitly to autotp() before initialize(), names alone (no name rules)
LLAMA_PLAN = {r"self_attn\.[qkv]_proj$": "column", r"mlp\.(gate|up)_proj$": "column",
              r".*\.(o_proj|down_proj)\.weight$": "row"}
# Softmax ignores a key bias (it adds one q·b_k to a whole row of scores): its gradient is rounding
# noise, so it stays ~0 in both runs instead of matching relatively (CONVENTIONS: parity with Adam).
ZERO_GRADIENT = ("attention.self.key.bias",)


def _config(stage, autotp=True):
    cfg = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": None,
           "gradient_clipping": CLIP,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "eps": EPS}},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if autotp:
        cfg["tensor_parallel"] = {"autotp_size": T}
    return cfg


def _micro_batch(step, micro, dp_rank):
    """This data-parallel rank's micro-batch ``micro`` of the step's batch."""
    batch = hf_batch(step, BATCH)
    start = dp_rank * MICRO * ACCUM + micro * MICRO
    return {k: v[start:start + MICRO] for k, v in batch.items()}


def _train(engine):
    from shardspeed import comm
    from shardspeed.tensor_parallel import slice_spec

    unit = comm.get_model_parallel_unit()
    dp_rank, norms = unit.get_data_parallel_rank(), []
    for step in range(STEPS):
        for micro in range(ACCUM):
            out = engine(**_micro_batch(step, micro, dp_rank))  # as users call it: keywords, a ModelOutput
            engine.backward(out.loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    state = engine.module.state_dict()  # stage 3: gathered over the data-parallel group
    params = {n: (state[n].clone(), slice_spec(p)) for n, p in engine.module.named_parameters()}
    return {"tp_rank": unit.get_tensor_model_parallel_rank(), "dp": (engine.topo.dp_rank, engine.topo.dp_world_size),
            "norms": norms, "params": params, "types": sorted({type(m).__name__ for m in engine.module.modules()})}


def _refusals():
    import shardspeed
    from shardspeed import comm

    messages = []
    model = hf_model("gpt2")
    for kwargs in ({"config": {**_config(1), "tensor_parallel": {"autotp_size": 4}}},  # the unit has T = 2
                   {"config": _config(1), "optimizer": torch.optim.AdamW(model.parameters())}):
        try:
            shardspeed.initialize(model=model, **kwargs)
        except ValueError as e:
            messages.append(str(e))
    comm.destroy_model_parallel()
    try:  # no unit: initialize makes one, and 3 does not divide 4 ranks
        shardspeed.initialize(model=model, config={**_config(1), "tensor_parallel": {"autotp_size": 3}})
    except ValueError as e:
        messages.append(str(e))
    return messages


SAVED = ("gpt2", 1)  # this case also writes a checkpoint


def _worker(rank, ckpt):
    import shardspeed
    from shardspeed.tensor_parallel import autotp

    out = {}
    for kind, stage in CASES:  # the first call makes the unit (T = 2); the others find it
        engine, *_ = shardspeed.initialize(model=hf_model(kind), config=_config(stage))
        out[(kind, stage)] = _train(engine)
        if (kind, stage) == SAVED:
            engine.save_checkpoint(ckpt)
    # sliced by the user, then initialize() without tensor_parallel: the unit made above is used
    model = autotp(hf_model("llama"), T, plan=LLAMA_PLAN, use_default_rules=False)
    engine, *_ = shardspeed.initialize(model=model, config=_config(0, autotp=False))
    out[("llama", "autotp()")] = _train(engine)
    out["refusals"] = _refusals()
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tmp_path_factory.mktemp("autotp_ckpt"))


@pytest.fixture(scope="module")
def ranks(ckpt):
    return run_ranks(_worker, T * D, ckpt, timeout=400)


def _reference(kind):
    model = hf_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, eps=EPS)
    norms = []
    for step in range(STEPS):
        # one batch; the engine averages the micro-batches' token means (equal micro-batches: the same)
        loss = model(**hf_batch(step, BATCH)).loss
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
    return model, norms


def _joined(ranks, case, tp_ranks):
    """Every parameter of one data-parallel replica, joined from its tensor-parallel ranks."""
    results = [ranks[r][case] for r in tp_ranks]
    assert [r["tp_rank"] for r in results] == list(range(T))
    return {name: value if spec is None else join_slices([r["params"][name][0] for r in results], spec)
            for name, (value, spec) in results[0]["params"].items()}


@pytest.mark.parametrize("kind, stage", [*CASES, ("llama", "autotp()")])
def test_autotp_trains_like_the_unsliced_model(ranks, kind, stage):
    ref, ref_norms = _reference(kind)
    ref_params = dict(ref.named_parameters())
    case = (kind, stage)
    for r, res in enumerate(ranks):
        assert res[case]["dp"] == (r // T, D)  # ZeRO and the data run over the data-parallel group only
        assert {"ColumnParallelLinear", "RowParallelLinear"} <= set(res[case]["types"])
        assert res[case]["norms"] == pytest.approx(ref_norms, rel=1e-5)  # the norm over all slices, once each
    for replica in (range(0, T), range(T, 2 * T)):  # global ranks: tensor innermost, then data
        full = _joined(ranks, case, list(replica))
        assert full.keys() == ref_params.keys()
        for name, value in full.items():
            want, got = ref_params[name].detach(), value  # Conv1D slices keep its [in, out] layout
            assert got.shape == want.shape, name
            if name.endswith(ZERO_GRADIENT):
                assert (got - want).abs().max() < 1e-8, name
                continue
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel < 1e-5, f"{kind} stage {stage}: {name} differs by {rel:.3g} relative"


def test_sizes_that_disagree_and_stale_parameters_are_refused(ranks):
    assert ranks[0]["refusals"] == [
        "config tensor_parallel.autotp_size is 4, but the model-parallel unit (initialize(mpu=...) or "
        "shardspeed.initialize_model_parallel()) has tensor-parallel size 2: make them equal",
        "initialize(optimizer=...) with tensor_parallel.autotp_size 2: AutoTP replaces the model's Linear layers, "
        "so parameters taken before initialize() are the unsliced ones. Give the optimizer in the config or as a "
        "callable params -> optimizer, or slice first (shardspeed.tensor_parallel.autotp(model)) and build them "
        "from the sliced model",
        "tensor_parallel_size 3 does not divide the world size 4: the ranks cannot be split into equal model "
        "replicas; use a T that divides 4",
    ]


def _load_unsliced(rank, ckpt):
    import shardspeed

    engine, *_ = shardspeed.initialize(model=hf_model("gpt2"), config=_config(0, autotp=False))
    engine.load_checkpoint(ckpt)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def test_autotp_gpt2_checkpoint_loads_into_the_unsliced_hugging_face_model(ranks, ckpt):
    """GPT-2's Conv1D slices keep its [in, out] layout, so what AutoTP saved at T=2 is the Hugging Face
    model's own state: zero_to_fp32's output loads into a fresh GPT2LMHeadModel, and one unsliced rank
    resumes the checkpoint, both holding exactly the parameters trained at T=2."""
    from shardspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = _joined(ranks, SAVED, list(range(T)))
    model = hf_model("gpt2")
    missing, unexpected = model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(ckpt), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte, saved once
    resumed = run_ranks(_load_unsliced, 1, ckpt)[0]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
        assert torch.equal(resumed[name], trained[name]), name
