"""The profiler's totals against hand counts: MACs exact, FLOPs within 2%."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shardspeed.profiling import FlopsProfiler, get_model_profile


def _profile(model, *args):
    prof = FlopsProfiler(model)
    prof.start_profile()
    with torch.no_grad():
        model(*args)
    prof.stop_profile()
    return prof


def test_linear_model():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    b = 4
    prof = _profile(model, torch.randn(b, 64))
    macs = b * 64 * 128 + b * 128 * 32
    flops = 2 * macs + b * 128 + b * 32 + b * 128  # two bias adds, one relu
    assert prof.get_total_macs() == macs
    assert prof.get_total_flops() == pytest.approx(flops, rel=0.02)
    assert prof.get_total_params() == 64 * 128 + 128 + 128 * 32 + 32
    assert prof.stats["0"].macs == b * 64 * 128 and prof.stats["2"].macs == b * 128 * 32


class Copies(nn.Module):
    def forward(self, x):
        y = x.clone().t().contiguous()
        return y.copy_(x.t())


def test_copies_count_nothing():
    assert _profile(Copies(), torch.randn(64, 64)).get_total_flops() == 0


def test_linear_on_three_dimensional_input_counts_the_same():
    lin = nn.Linear(48, 40)
    prof = _profile(lin, torch.randn(2, 7, 48))
    assert prof.get_total_macs() == 2 * 7 * 48 * 40


class Attention(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


def test_attention_model():
    b, t, d, h = 2, 16, 64, 4
    prof = _profile(Attention(d, h), torch.randn(b, t, d))
    linear = b * t * d * 3 * d + b * t * d * d
    scores = b * h * t * t * (d // h) * 2  # Q.K^T and P.V
    assert prof.get_total_macs() == linear + scores
    flops = 2 * (linear + scores) + b * t * 3 * d + b * t * d + 5 * b * h * t * t
    assert prof.get_total_flops() == pytest.approx(flops, rel=0.02)


def test_matmul_written_by_hand_is_counted():
    class Bmm(nn.Module):
        def forward(self, a, w):
            return a @ w

    prof = _profile(Bmm(), torch.randn(3, 5, 7), torch.randn(3, 7, 11))
    assert prof.get_total_macs() == 3 * 5 * 7 * 11


def test_convolution_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, groups=2),
                          nn.ConvTranspose2d(16, 4, 2, stride=2, bias=False))
    x = torch.randn(2, 3, 12, 12)
    prof = _profile(model, x)
    o1 = 2 * 8 * 12 * 12
    o2 = 2 * 16 * 5 * 5
    macs1 = o1 * 3 * 9
    macs2 = o2 * (8 // 2) * 9
    macs3 = (2 * 16 * 5 * 5) * 4 * 4  # each input element through a 2x2 kernel to 4 outputs
    assert prof.get_total_macs() == macs1 + macs2 + macs3
    flops = 2 * (macs1 + macs2 + macs3) + o1 + o2 + o1  # biases of the first two, relu
    assert prof.get_total_flops() == pytest.approx(flops, rel=0.02)


def test_tree_depth_and_report(tmp_path):
    from tests.distributed.workloads import tiny_gpt

    model = tiny_gpt()
    x = torch.randint(0, model.c.vocab, (2, 8))
    out = tmp_path / "profile.txt"
    flops, macs, params = get_model_profile(model, args=[x], print_profile=True, module_depth=1, top_modules=2,
                                            as_string=False, output_file=str(out))
    assert params == sum(p.numel() for p in model.parameters())
    assert macs > 0 and flops > 2 * macs
    text = out.read_text()
    assert "blocks (ModuleList)" in text and "blocks.0.qkv" not in text  # depth 1 only
    assert "top 2 modules by MACs" in text
    s, m, p = get_model_profile(model, args=[x], print_profile=False)
    assert s.endswith("FLOPs") and m.endswith("MACs")


def test_input_shape_and_errors():
    lin = nn.Linear(8, 4)
    flops, macs, _ = get_model_profile(lin, input_shape=(3, 8), print_profile=False, as_string=False)
    assert macs == 3 * 8 * 4
    with pytest.raises(ValueError, match="needs input_shape"):
        get_model_profile(lin)
    with pytest.raises(ValueError, match="not both"):
        get_model_profile(lin, input_shape=(1, 8), args=[torch.randn(1, 8)])


def test_latency_is_measured():
    prof = _profile(nn.Linear(256, 256), torch.randn(64, 256))
    assert prof.get_total_duration() > 0 and math.isfinite(prof.get_total_duration())
