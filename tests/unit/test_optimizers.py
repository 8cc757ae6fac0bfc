"""Optimizers against plain reference implementations."""

import math

import pytest
import torch

from shardspeed.config import ConfigError, load_config
from shardspeed.ops.adam import FusedAdam as OpsAdam
from shardspeed.ops.lamb import FusedLamb as OpsLamb
from shardspeed.optim import FusedAdam, FusedLamb, build_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(5, generator=g), torch.randn(3, 2, 2, generator=g)]


def _run(make_opt, steps=4, seed=0):
    params = [p.clone().requires_grad_() for p in _params(seed)]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


def _close(a, b, tol=1e-6):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b, strict=False))


def test_ops_names_are_the_optimizers():
    assert OpsAdam is FusedAdam and OpsLamb is FusedLamb


@pytest.mark.parametrize("adam_w_mode, ref", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_fused_adam_matches_torch(adam_w_mode, ref):
    ours = _run(lambda p: FusedAdam(p, lr=0.01, weight_decay=0.1, adam_w_mode=adam_w_mode))
    theirs = _run(lambda p: ref(p, lr=0.01, weight_decay=0.1))
    assert _close(ours, theirs)


def test_fused_adam_uses_torch_fused_kernel_by_default():
    opt = FusedAdam([torch.zeros(3, requires_grad=True)])
    assert opt.param_groups[0]["fused"] is True


def _adam_reference(params, grads_seq, lr, b1, b2, eps, wd, decoupled, bias_correction):
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_seq, start=1):
        for i, (p, g) in enumerate(zip(params, grads, strict=False)):
            if wd and decoupled:
                p.mul_(1 - lr * wd)
            elif wd:
                g = g + wd * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mh, vh = (m[i] / (1 - b1**t), v[i] / (1 - b2**t)) if bias_correction else (m[i], v[i])
            p -= lr * mh / (vh.sqrt() + eps)
    return params


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_without_bias_correction_matches_the_formula(decoupled):
    steps = 3
    g = torch.Generator().manual_seed(1)
    grads_seq = [[torch.randn(p.shape, generator=g) for p in _params()] for _ in range(steps)]
    ours = _run(lambda p: FusedAdam(p, lr=0.01, weight_decay=0.1, adam_w_mode=decoupled, bias_correction=False),
                steps=steps)
    ref = _adam_reference(_params(), grads_seq, 0.01, 0.9, 0.999, 1e-8, 0.1, decoupled, False)
    assert _close(ours, ref, 1e-5)


def _lamb_reference(params, grads_seq, lr, b1, b2, eps, wd, max_grad_norm, max_coeff, min_coeff, bias_correction):
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_seq, start=1):
        total = math.sqrt(sum(float(g.norm()) ** 2 for g in grads))
        clip = (total + 1e-6) / max_grad_norm if max_grad_norm > 0 else 1.0
        for i, (p, g) in enumerate(zip(params, grads, strict=False)):
            if clip > 1:
                g = g / clip
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mh, vh = (m[i] / (1 - b1**t), v[i] / (1 - b2**t)) if bias_correction else (m[i], v[i])
            u = mh / (vh.sqrt() + eps) + wd * p
            w_norm, u_norm = float(p.norm()), float(u.norm())
            coeff = min(max(w_norm / u_norm, min_coeff), max_coeff) if w_norm > 0 and u_norm > 0 else 1.0
            p -= lr * coeff * u
    return params


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_lamb_matches_the_formula(bias_correction, max_grad_norm):
    steps = 3
    g = torch.Generator().manual_seed(1)
    grads_seq = [[torch.randn(p.shape, generator=g) for p in _params()] for _ in range(steps)]
    kw = dict(lr=0.01, weight_decay=0.01, max_grad_norm=max_grad_norm, max_coeff=0.5, min_coeff=0.08,
              bias_correction=bias_correction)
    ours = _run(lambda p: FusedLamb(p, **kw), steps=steps)
    ref = _lamb_reference(_params(), grads_seq, 0.01, 0.9, 0.999, 1e-8, 0.01, max_grad_norm, 0.5, 0.08,
                          bias_correction)
    assert _close(ours, ref, 1e-5)


def test_lamb_trust_ratio_is_clamped_and_one_for_zero_weights():
    p = [torch.zeros(4, requires_grad=True), torch.full((4,), 100.0, requires_grad=True)]
    opt = FusedLamb(p, lr=0.1, max_coeff=2.0, min_coeff=0.5)
    for t in p:
        t.grad = torch.ones(4)
    opt.step()
    assert opt.last_coeffs[0].tolist() == [1.0, 2.0]


def test_lamb_finishes_weight_and_update_norms_in_one_reduction():
    seen = []
    p = [torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    opt = FusedLamb(p, lr=0.1)
    opt.norm_reducer = lambda sq: (seen.append(sq.shape), sq * 4)[1]
    for t in p:
        t.grad = torch.ones_like(t)
    opt.step()
    assert seen == [torch.Size([4])]  # (||w||^2, ||u||^2) of both tensors in one vector


def test_build_optimizer_types_and_params():
    p = [torch.zeros(2, requires_grad=True)]
    opt, clip = build_optimizer(load_config({"optimizer": {"type": "Adam", "params": {
        "lr": 1e-3, "max_grad_norm": 1.0, "betas": [0.8, 0.9]}}}).optimizer, p)
    assert isinstance(opt, FusedAdam) and opt.param_groups[0]["decoupled_weight_decay"]  # adam_w_mode default
    assert clip == 1.0 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt, _ = build_optimizer(load_config({"optimizer": {"type": "adam", "params": {"adam_w_mode": False}}}
                                         ).optimizer, p)
    assert not opt.param_groups[0]["decoupled_weight_decay"]
    opt, _ = build_optimizer(load_config({"optimizer": {"type": "Lamb", "params": {
        "lr": 4e-3, "max_grad_norm": 1.0, "weight_decay": 0.01, "bias_correction": False, "max_coeff": 0.5,
        "min_coeff": 0.08}}}).optimizer, p)  # the seed's BERT config
    assert isinstance(opt, FusedLamb) and opt.param_groups[0]["max_coeff"] == 0.5
    opt, _ = build_optimizer(load_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}
                                         ).optimizer, p)
    assert isinstance(opt, torch.optim.SGD)
    opt, _ = build_optimizer(load_config({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}}
                                         ).optimizer, p)
    assert type(opt) is torch.optim.Adam


def test_unknown_optimizer_lists_the_supported_ones():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ConfigError) as e:
        build_optimizer(load_config({"optimizer": {"type": "Adamm"}}).optimizer, p)
    assert str(e.value) == ("unknown optimizer type 'Adamm' in optimizer.type; supported: Adam, AdamW, Lamb, SGD, "
                            "Adagrad. Did you mean 'Adam'?")


def test_unknown_optimizer_param_is_named():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ConfigError, match="optimizer.params.weight_dacay is not a parameter of AdamW.*"
                                          "Did you mean 'weight_decay'"):
        build_optimizer(load_config({"optimizer": {"type": "AdamW", "params": {"weight_dacay": 0.1}}}).optimizer, p)
