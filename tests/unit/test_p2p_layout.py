"""The p2p header (comm/p2p.py, Note: the header): every structure a stage may send decodes back to
the same tree, tensor specs and needs-grad flags; anything else is refused with its path."""

import pytest
import torch

from shardspeed.comm.p2p import Layout, TensorSpec, encode, leaves


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, (tuple, list, dict)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, dict):
            return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
        return all(_same(x, y) for x, y in zip(a, b))
    return a is None and b is None


STRUCTURES = [
    torch.randn(2, 3),
    torch.tensor(5),  # 0-dim
    (torch.randn(2, requires_grad=True), torch.arange(4), None),
    [torch.ones(1, 2, 3, dtype=torch.bfloat16), (torch.zeros(0), {"m": torch.ones(2, dtype=torch.bool)})],
    {"hidden": torch.randn(3, 4, requires_grad=True), "ids": torch.arange(3), "näme ünicode": [torch.ones(1)]},
]


@pytest.mark.parametrize("obj", STRUCTURES, ids=range(len(STRUCTURES)))
def test_round_trip(obj):
    codes, ts = encode(obj)
    assert ts == leaves(obj) or all(a is b for a, b in zip(ts, leaves(obj)))
    layout = Layout(codes)
    assert layout.specs == [TensorSpec(tuple(t.shape), t.dtype, t.requires_grad and t.is_floating_point())
                            for t in ts]
    assert _same(layout.build([t.detach() for t in ts]), obj)


def test_integer_tensor_never_needs_grad():
    codes, _ = encode(torch.arange(3))
    assert Layout(codes).specs[0].needs_grad is False


def test_refusals_name_the_path_and_type():
    with pytest.raises(TypeError, match=r"output\[1\]\['x'\] is a str"):
        encode((torch.ones(1), {"x": "hello"}))
    with pytest.raises(TypeError, match=r"key 3 of type int"):
        encode({3: torch.ones(1)})
    with pytest.raises(TypeError, match=r"output is a float"):
        encode(1.5)
    with pytest.raises(ValueError, match="malformed"):
        Layout([0, 0, 0, 1, 2, 99])
