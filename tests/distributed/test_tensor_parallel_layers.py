"""Tensor-parallel layers on real ranks against the unsliced torch layer built from the same seed:
outputs, input gradients, and every sliced gradient reassembled with join_slices, at T = 2 (with two
data-parallel replicas) and T = 4; the model-parallel RNG streams and their replay under activation
checkpointing; the sizes each layer refuses.

All ranks run one job (a start of 4 ranks costs seconds on 2 cores); the tests below read its parts.
The references are computed here, in the test process, from the same seeds.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shardspeed.tensor_parallel import SliceSpec, join_slices, take_slice
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.world_size(4)

B, S, IN, HID, OUT, VOCAB = 2, 4, 8, 16, 12, 8  # S, HID, OUT, VOCAB divisible by 4; OUT by 4 x stride 3
SIZES = (2, 4)


def _data(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _ids(seed, high, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g)


def _run(layer_fn, x, probe_seed):
    """Forward, a probe loss sum(y * probe) so every output element has its own gradient, backward."""
    x = x.clone().requires_grad_(x.is_floating_point())
    y = layer_fn(x)
    (y * _data(probe_seed, *y.shape)).sum().backward()
    return y.detach(), (x.grad if x.is_floating_point() else None)


def _grads(*modules):
    return [{n: p.grad.clone() for n, p in m.named_parameters()} for m in modules]


# -- the worker -------------------------------------------------------------------------------------------
def _layer_cases(tp):
    from shardspeed import tensor_parallel as T

    out = {}
    torch.manual_seed(0)
    col = T.ColumnParallelLinear(IN, OUT)
    out["column"] = (*_run(col, _data(1, B, S, IN), 2), *_grads(col))
    torch.manual_seed(0)
    qkv = T.ColumnParallelLinear(IN, OUT, bias=False, stride=3)
    out["column_stride3"] = (*_run(qkv, _data(1, B, S, IN), 2), *_grads(qkv))
    torch.manual_seed(0)
    local = T.ColumnParallelLinear(IN, OUT, gather_output=False, init_method=lambda w: nn.init.normal_(w, std=0.02))
    out["column_local"] = (*_run(local, _data(1, B, S, IN), 3), *_grads(local))
    torch.manual_seed(0)
    row = T.RowParallelLinear(IN, OUT)
    out["row"] = (*_run(row, _data(1, B, S, IN), 2), *_grads(row))
    torch.manual_seed(0)
    emb = T.VocabParallelEmbedding(VOCAB, IN, padding_idx=5)
    out["embedding"] = (*_run(emb, _ids(4, VOCAB, B, S), 2), *_grads(emb))
    torch.manual_seed(0)
    fc = T.ColumnParallelLinear(IN, HID, gather_output=False)
    proj = T.RowParallelLinear(HID, IN, input_is_parallel=True)
    out["mlp"] = (*_run(lambda x: proj(F.gelu(fc(x))), _data(1, B, S, IN), 2), *_grads(fc, proj))
    # sequence parallelism, in Megatron's [S, B, IN] layout and batch-first: this rank holds S / T positions
    for dim in (0, 1):
        torch.manual_seed(0)
        ln = T.SequenceParallelLayerNorm(IN)
        fc = T.ColumnParallelLinear(IN, HID, gather_output=False, sequence_parallel=True, sequence_dim=dim)
        proj = T.RowParallelLinear(HID, IN, input_is_parallel=True, sequence_parallel=True, sequence_dim=dim)
        shape = (S, B, IN) if dim == 0 else (B, S, IN)
        x = _data(1, *shape).chunk(tp.world_size, dim=dim)[tp.rank].clone().requires_grad_()
        y = proj(F.gelu(fc(ln(x))))
        (y * _data(2, *shape).chunk(tp.world_size, dim=dim)[tp.rank]).sum().backward()
        out[f"sequence_dim{dim}"] = (y.detach(), x.grad, *_grads(ln, fc, proj),
                                     [n for n, p in [*ln.named_parameters(), *proj.named_parameters()]
                                      if T.is_sequence_parallel(p)])
    # cross-entropy on this rank's slice of the vocabulary, large logits, some targets ignored
    full = _data(5, B, S, VOCAB) * 30
    target = _ids(6, VOCAB, B, S)
    target[0, :2] = -100
    logits = take_slice(full, SliceSpec(-1), tp.world_size, tp.rank).requires_grad_()
    loss_mean = T.vocab_parallel_cross_entropy(logits, target, reduction="mean")
    loss_mean.backward()
    per_token = T.vocab_parallel_cross_entropy(logits.detach(), target)
    out["cross_entropy"] = (loss_mean.detach(), logits.grad, per_token)
    return out


def _rng_cases():
    """Dropout masks in and out of fork(); a checkpointed sliced MLP with dropout equals the plain one."""
    from shardspeed import checkpointing
    from shardspeed import tensor_parallel as T

    T.model_parallel_seed(1234)
    with T.get_rng_tracker().fork():
        inside = F.dropout(torch.ones(256), 0.5)
    outside = F.dropout(torch.ones(256), 0.5)
    torch.manual_seed(0)
    fc = T.ColumnParallelLinear(IN, HID, gather_output=False)
    proj = T.RowParallelLinear(HID, IN, input_is_parallel=True)

    def block(x):
        h = F.gelu(fc(x))
        with T.get_rng_tracker().fork():  # the hidden units are sliced: each rank its own mask
            h = F.dropout(h, 0.5)
        return proj(h)

    runs = []
    for recompute in (False, True, True):
        checkpointing.configure(None, checkpoint_in_cpu=len(runs) == 2)  # plain, then the kept-inputs path
        T.model_parallel_seed(77)
        fc.zero_grad(), proj.zero_grad()
        x = _data(1, B, S, IN).requires_grad_()
        y = checkpointing.checkpoint(block, x) if recompute else block(x)
        (y * _data(2, *y.shape)).sum().backward()
        with T.get_rng_tracker().fork():
            after = torch.rand(4)  # the stream continues as if nothing had been recomputed
        runs.append((y.detach(), x.grad, *_grads(fc, proj), after, torch.rand(4)))
    checkpointing.reset()
    return {"inside": inside, "outside": outside, "runs": runs}


def _refusals():
    from shardspeed import tensor_parallel as T

    messages = []
    for make in (lambda: T.ColumnParallelLinear(IN, 6, stride=2), lambda: T.ColumnParallelLinear(IN, 5),
                 lambda: T.RowParallelLinear(5, 4), lambda: T.VocabParallelEmbedding(61, 4),
                 lambda: T.RowParallelLinear(IN, 4, sequence_parallel=True),
                 lambda: T.ColumnParallelLinear(IN, 4, skip_bias_add=True)):
        try:
            make()
        except ValueError as e:
            messages.append(str(e))
    return messages


def _worker(rank):
    import shardspeed
    from shardspeed import comm
    from shardspeed.tensor_parallel import current_tensor_parallel_group

    results = {}
    for t in SIZES:
        shardspeed.initialize_model_parallel(tensor_parallel_size=t)
        tp = current_tensor_parallel_group()
        results[t] = {"tp_rank": tp.rank, "layers": _layer_cases(tp)}
        if t == 2:
            results[t]["rng"] = _rng_cases()
            results[t]["refusals"] = _refusals()
        comm.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, 4)


# -- the references -------------------------------------------------------------------------------------
def _close(a, b, tol=1e-6):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def _joined(ranks, t, case, which, name, spec):
    """The full gradient from tensor-parallel ranks 0..t-1 (global ranks 0..t-1: tensor is innermost)."""
    assert [ranks[r][t]["tp_rank"] for r in range(t)] == list(range(t))
    return join_slices([ranks[r][t]["layers"][case][which][name] for r in range(t)], spec)


def _check_linear(ranks, t, case, ref, w_spec, b_spec):
    y_ref, x_grad_ref = _run(ref, _data(1, B, S, IN), 2)
    g_ref = _grads(ref)[0]
    for res in ranks:
        y, x_grad, _ = res[t]["layers"][case]
        _close(y, y_ref)
        _close(x_grad, x_grad_ref)
    _close(_joined(ranks, t, case, 2, "weight", w_spec), g_ref["weight"])
    if "bias" in g_ref:
        got = _joined(ranks, t, case, 2, "bias", b_spec) if b_spec else ranks[0][t]["layers"][case][2]["bias"]
        _close(got, g_ref["bias"])


@pytest.mark.parametrize("t", SIZES)
def test_column_and_row_parallel_linear_equal_nn_linear(ranks, t):
    torch.manual_seed(0)
    _check_linear(ranks, t, "column", nn.Linear(IN, OUT), SliceSpec(0), SliceSpec(0))
    torch.manual_seed(0)
    _check_linear(ranks, t, "column_stride3", nn.Linear(IN, OUT, bias=False), SliceSpec(0, 3), None)
    # init_method draws the full weight (normal, 0.02) from the seed; the bias starts at zero
    torch.manual_seed(0)
    ref = nn.Linear(IN, OUT)
    with torch.no_grad():
        torch.manual_seed(0)
        ref.weight.copy_(nn.init.normal_(torch.empty(OUT, IN), std=0.02))
        ref.bias.zero_()
    # without gather_output each rank keeps its slice of the features and probes it with the same
    # tensor: in the unsliced layer that is that tensor repeated t times along the features
    x = _data(1, B, S, IN).requires_grad_()
    y_ref = ref(x)
    (y_ref * torch.cat([_data(3, B, S, OUT // t)] * t, dim=-1)).sum().backward()
    for res in ranks:
        y, x_grad, _ = res[t]["layers"]["column_local"]
        _close(y, take_slice(y_ref.detach(), SliceSpec(-1), t, res[t]["tp_rank"]))
        _close(x_grad, x.grad)  # copy_to_tensor_parallel_region summed the ranks' partial gradients
    _close(_joined(ranks, t, "column_local", 2, "weight", SliceSpec(0)), ref.weight.grad)
    _close(_joined(ranks, t, "column_local", 2, "bias", SliceSpec(0)), ref.bias.grad)
    torch.manual_seed(0)
    _check_linear(ranks, t, "row", nn.Linear(IN, OUT), SliceSpec(1), None)


@pytest.mark.parametrize("t", SIZES)
def test_vocab_parallel_embedding_equals_nn_embedding(ranks, t):
    torch.manual_seed(0)
    ref = nn.Embedding(VOCAB, IN, padding_idx=5)
    y_ref, _ = _run(ref, _ids(4, VOCAB, B, S), 2)
    for res in ranks:
        _close(res[t]["layers"]["embedding"][0], y_ref)
    grad = _joined(ranks, t, "embedding", 2, "weight", SliceSpec(0))
    _close(grad, ref.weight.grad)
    assert grad[5].abs().sum() == 0 and _ids(4, VOCAB, B, S).eq(5).any()  # the padding row got no gradient


@pytest.mark.parametrize("t", SIZES)
def test_column_row_mlp_equals_nn_sequential(ranks, t):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, IN))
    y_ref, x_grad_ref = _run(ref, _data(1, B, S, IN), 2)
    for res in ranks:
        y, x_grad, g_fc, g_proj = res[t]["layers"]["mlp"]
        _close(y, y_ref)
        _close(x_grad, x_grad_ref)
        _close(g_proj["bias"], ref[2].bias.grad)  # replicated: the same full gradient on every rank
    _close(_joined(ranks, t, "mlp", 2, "weight", SliceSpec(0)), ref[0].weight.grad)
    _close(_joined(ranks, t, "mlp", 2, "bias", SliceSpec(0)), ref[0].bias.grad)
    _close(_joined(ranks, t, "mlp", 3, "weight", SliceSpec(1)), ref[2].weight.grad)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("t", SIZES)
def test_sequence_parallel_block_equals_the_unsliced_one(ranks, t, dim):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.LayerNorm(IN), nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, IN))
    shape = (S, B, IN) if dim == 0 else (B, S, IN)
    x = _data(1, *shape).requires_grad_()
    y_ref = ref(x)
    (y_ref * _data(2, *shape)).sum().backward()
    case = f"sequence_dim{dim}"
    for res in ranks:
        y, x_grad, g_ln, g_fc, g_proj, marked = res[t]["layers"][case]
        r = res[t]["tp_rank"]
        _close(y, y_ref.detach().chunk(t, dim)[r])
        _close(x_grad, x.grad.chunk(t, dim)[r])
        # the layers summed these over the tensor-parallel group themselves: full gradients everywhere
        _close(g_ln["weight"], ref[0].weight.grad)
        _close(g_ln["bias"], ref[0].bias.grad)
        _close(g_proj["bias"], ref[3].bias.grad)
        assert marked == ["weight", "bias", "bias"]
    _close(_joined(ranks, t, case, 3, "weight", SliceSpec(0)), ref[1].weight.grad)
    _close(_joined(ranks, t, case, 4, "weight", SliceSpec(1)), ref[3].weight.grad)


@pytest.mark.parametrize("t", SIZES)
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(ranks, t):
    full = (_data(5, B, S, VOCAB) * 30).requires_grad_()
    target = _ids(6, VOCAB, B, S)
    target[0, :2] = -100
    loss = F.cross_entropy(full.view(-1, VOCAB), target.view(-1))
    loss.backward()
    per_token = F.cross_entropy(full.detach().view(-1, VOCAB), target.view(-1), reduction="none").view(B, S)
    for res in ranks:
        got_loss, _, got_per_token = res[t]["layers"]["cross_entropy"]
        _close(got_loss, loss.detach())
        _close(got_per_token, per_token)
        assert got_loss.dtype == torch.float32
    grad = join_slices([ranks[r][t]["layers"]["cross_entropy"][1] for r in range(t)], SliceSpec(-1))
    _close(grad, full.grad)
    assert grad[0, :2].abs().sum() == 0  # ignored targets: no gradient


def test_dropout_masks_differ_across_tensor_parallel_ranks_only_inside_fork(ranks):
    rng = [res[2]["rng"] for res in ranks]  # T = 2: ranks 0, 1 are one tensor-parallel group, 2, 3 another
    for r in range(4):
        assert torch.equal(rng[r]["outside"], rng[0]["outside"])  # replicated regions: one mask
    assert not torch.equal(rng[0]["inside"], rng[1]["inside"])  # sliced regions: a mask per slice
    assert torch.equal(rng[0]["inside"], rng[2]["inside"]) and torch.equal(rng[1]["inside"], rng[3]["inside"])


def test_checkpoint_replays_the_model_parallel_stream(ranks):
    for res in ranks:
        plain, recomputed, kept_inputs = res[2]["rng"]["runs"]
        for run in (recomputed, kept_inputs):
            _close(run[0], plain[0])
            _close(run[1], plain[1])
            for got, want in zip(run[2:4], plain[2:4]):
                for name in want:
                    _close(got[name], want[name])
            assert torch.equal(run[4], plain[4]) and torch.equal(run[5], plain[5])  # both streams moved on alike


def test_sizes_a_layer_cannot_slice_are_refused_by_number(ranks):
    assert ranks[0][2]["refusals"] == [
        "ColumnParallelLinear: out_features 6 is not divisible by the tensor-parallel size 2 × stride 2",
        "ColumnParallelLinear: out_features 5 is not divisible by the tensor-parallel size 2",
        "RowParallelLinear: in_features 5 is not divisible by the tensor-parallel size 2: each of the 2 ranks "
        "must hold an equal slice",
        "VocabParallelEmbedding: num_embeddings 61 is not divisible by the tensor-parallel size 2; pad the "
        "vocabulary to a multiple of 2 (e.g. 62)",
        "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (its input comes from a "
        "ColumnParallelLinear(gather_output=False))",
        "ColumnParallelLinear: skip_bias_add with gather_output would return the full output but only this rank's "
        "slice of the bias; pass gather_output=False",
    ]
