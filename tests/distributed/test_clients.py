"""Real clients on 2 ranks, called the way their users call them, against single-process PyTorch:
Hugging Face transformers models (GPT-2, BERT, Llama) at every ZeRO stage and under zero.Init, a
torchvision-style ResNet at stages 0 and 3, and the habits of Hugging Face / Lightning loops
(their own ``optimizer.zero_grad()`` and ``model.zero_grad()``)."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.hf_models import hf_batch, hf_model, image_batch, resnet

pytest.importorskip("transformers")

LR, WD, STEPS, BATCH = 3e-3, 0.01, 3, 4
# (stage, built under zero.Init, habit): habit "zero_grad" calls optimizer.zero_grad() and
# model.zero_grad() after every step, as Hugging Face's and Lightning's loops do
VARIANTS = [(0, False, None), (1, False, None), (2, False, None), (3, False, None), (3, True, None),
            (0, False, "zero_grad"), (1, False, "zero_grad"), (2, False, "zero_grad"), (3, False, "zero_grad")]


def _config(stage, world):
    return {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world, "steps_per_print": None,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def _full_params(module):
    names = {n for n, _ in module.named_parameters()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items() if k in names}


def _slice(batch, rank, world):
    per = BATCH // world
    if isinstance(batch, dict):
        return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    return tuple(t[rank * per:(rank + 1) * per] for t in batch)


def _loss(model_kind, model, batch):
    if model_kind == "resnet":
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y), None
    out = model(**batch)  # as users call it: keyword inputs, labels, a ModelOutput back
    return out.loss, type(out).__name__


def _worker(rank, kind, variants):
    import shardspeed

    world = 2
    results = []
    for stage, zero_init, habit in variants:
        build = (lambda: resnet()) if kind == "resnet" else (lambda: hf_model(kind))
        if zero_init:
            with shardspeed.zero.Init(config_dict_or_path=_config(stage, world)):
                model = build()
            # re-initialised by post_init() / the parent's loop, yet never left whole on any rank
            assert all(p.numel() == 0 for p in model.parameters())
        else:
            model = build()
        engine, optimizer, _, _ = shardspeed.initialize(model=model, config=_config(stage, world))
        out_type = None
        for step in range(STEPS):
            batch = image_batch(step, BATCH) if kind == "resnet" else hf_batch(step, BATCH)
            loss, out_type = _loss(kind, engine, _slice(batch, rank, world))
            engine.backward(loss)
            engine.step()
            if habit == "zero_grad":
                optimizer.zero_grad()
                engine.module.zero_grad()
        results.append({"params": _full_params(engine.module), "out_type": out_type})
    return results


def _reference(kind):
    model = resnet() if kind == "resnet" else hf_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    out_type = None
    for step in range(STEPS):
        batch = image_batch(step, BATCH) if kind == "resnet" else hf_batch(step, BATCH)
        loss, out_type = _loss(kind, model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _full_params(model), out_type


def _max_abs(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_transformers_models_equal_pytorch_at_every_stage(kind):
    ref, ref_type = _reference(kind)
    ranks = run_ranks(_worker, 2, kind, VARIANTS, timeout=400)
    for rank in ranks:
        for (stage, zero_init, habit), r in zip(VARIANTS, rank):
            assert r["out_type"] == ref_type  # the ModelOutput came back intact
            diff = _max_abs(r["params"], ref)
            assert diff < 2e-5, f"{kind} stage {stage} zero.Init={zero_init} habit={habit}: max |diff| {diff:.3g}"


def test_torchvision_style_resnet_at_stages_0_and_3():
    variants = [(0, False, None), (3, False, None), (3, True, None)]
    ref, _ = _reference("resnet")
    for rank in run_ranks(_worker, 2, "resnet", variants):
        for v, r in zip(variants, rank):
            assert _max_abs(r["params"], ref) < 2e-5, v
