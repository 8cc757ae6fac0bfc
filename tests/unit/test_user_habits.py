"""What users do to the engine in one process: modules that return dict subclasses and dataclasses
and modify outputs in place (stage 3), grad accumulation in bf16/fp16 (stage 0), and changing
requires_grad after initialize()."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

import shardspeed
from tests.distributed.workloads import max_rel_diff, synthetic_batch, tiny_gpt


class Output(OrderedDict):
    """A dict subclass output, as Hugging Face's ModelOutput is."""


@dataclasses.dataclass
class Hidden:
    h: torch.Tensor


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.fc1(x))  # in place on a module's output
        out = self.fc2(out)
        out += x  # torchvision's residual add, in place on a module's output
        return self.relu(out)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return Output(h=self.fc(x))


class AsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return Hidden(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.wrapped, self.dc = Wrapped(), AsDataclass()

    def forward(self, x):
        out = self.wrapped(self.blocks(x))
        assert type(out) is Output, type(out)  # not rebuilt as a plain dict
        hidden = self.dc(out["h"])
        assert type(hidden) is Hidden
        return hidden.h.pow(2).mean()


def _cfg(stage, **extra):
    return {"train_batch_size": 2, "steps_per_print": None, **extra,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def test_stage3_keeps_output_types_and_allows_in_place_ops_after_a_module():
    torch.manual_seed(0)
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    engine, *_ = shardspeed.initialize(model=model, config=_cfg(3))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    for _ in range(3):
        x = torch.randn(2, 8)
        engine.backward(engine(x))
        engine.step()
        opt.zero_grad()
        ref(x).backward()
        opt.step()
    got = engine.module.state_dict()
    assert max((got[k] - v).abs().max().item() for k, v in ref.state_dict().items()) == 0.0


def _train(cfg, steps=3):
    engine, *_ = shardspeed.initialize(model=tiny_gpt(), config=cfg)
    for step in range(steps):
        x, y = synthetic_batch(step, 2, 16, 64)
        engine.backward(engine(x, y))
        engine.step()
    names = {n for n, _ in engine.module.named_parameters()}
    return {k: v.float() for k, v in engine.module.state_dict().items() if k in names}


@pytest.mark.parametrize("accum", ["bf16", "fp16"])
@pytest.mark.parametrize("compute", [None, "bf16"])
def test_low_precision_grad_accum_dtype_at_stage_0(accum, compute):
    extra = {"bf16": {"enabled": True}} if compute else {}
    base = _train(_cfg(0, **extra))
    low = _train(_cfg(0, **extra, data_types={"grad_accum_dtype": accum}))
    assert 0 < max_rel_diff(low, base) < 3e-2  # rounded gradients (bf16: 8 bits of mantissa), the same training


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_requires_grad_changed_after_initialize_is_refused_by_name(change, stage):
    model = tiny_gpt()
    if change == "unfreeze":
        model.tok.weight.requires_grad_(False)
    engine, *_ = shardspeed.initialize(model=model, config=_cfg(stage))
    model.tok.weight.requires_grad_(change == "unfreeze")
    x, y = synthetic_batch(0, 2, 16, 64)
    engine.backward(engine(x, y))
    what = "frozen (requires_grad=False)" if change == "freeze" else "unfrozen (requires_grad=True)"
    with pytest.raises(RuntimeError, match=rf"parameter 'tok.weight' was {re_escape(what)} after initialize\(\): "
                                           "shardspeed plans gradient buffers and ZeRO partitions"):
        engine.step()


def re_escape(s):
    import re

    return re.escape(s)

