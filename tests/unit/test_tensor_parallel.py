"""Tensor-parallel layers, cross-entropy and RNG streams in one process (T = 1), the mpu's one-rank
unit, and the messages a user reads. The sliced behaviour is in tests/distributed."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardspeed
from shardspeed import checkpointing, comm
from shardspeed import tensor_parallel as tp


@pytest.fixture(autouse=True)
def _clean():
    comm.destroy_model_parallel()
    checkpointing.reset()
    yield
    comm.destroy_model_parallel()
    checkpointing.reset()
    tp.get_rng_tracker().reset()


def _same_module(a, b):
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_layers_at_t1_are_the_torch_layers_drawn_from_the_same_seed():
    x = torch.randn(3, 5, 6)
    for make_ref, make in ((lambda: nn.Linear(6, 4), lambda: tp.ColumnParallelLinear(6, 4)),
                           (lambda: nn.Linear(6, 4), lambda: tp.RowParallelLinear(6, 4)),
                           (lambda: nn.Linear(6, 4, bias=False), lambda: tp.ColumnParallelLinear(6, 4, bias=False))):
        torch.manual_seed(3)
        ref, after_ref = make_ref(), torch.rand(2)
        torch.manual_seed(3)
        layer, after = make(), torch.rand(2)
        _same_module(layer, ref)
        assert torch.equal(after, after_ref)  # the generator advanced exactly as the torch layer's
        assert torch.equal(layer(x), ref(x))
        assert layer.tp.world_size == 1 and tp.slice_spec(layer.weight) is not None
    torch.manual_seed(3)
    ref = nn.Embedding(10, 4, padding_idx=-2)
    torch.manual_seed(3)
    emb = tp.VocabParallelEmbedding(10, 4, padding_idx=-2)
    _same_module(emb, ref)
    assert emb.padding_idx == 8 and emb.weight[8].abs().sum() == 0
    ids = torch.tensor([[1, 8, 9]])
    assert torch.equal(emb(ids), ref(ids))


def test_skip_bias_add_returns_the_bias_to_add_later():
    torch.manual_seed(0)
    layer = tp.RowParallelLinear(6, 4, skip_bias_add=True)
    x = torch.randn(2, 6)
    y, bias = layer(x)
    assert bias is layer.bias
    assert torch.allclose(y + bias, F.linear(x, layer.weight, layer.bias))


def test_copies_share_the_group_and_a_saved_module_loads():
    torch.manual_seed(0)
    layer = tp.ColumnParallelLinear(6, 4)
    twin = copy.deepcopy(layer)  # torch's process groups cannot be copied; ours is shared
    assert twin.tp is layer.tp and twin.weight is not layer.weight
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.tp.world_size == 1 and torch.equal(loaded.weight, layer.weight)
    assert tp.slice_spec(loaded.weight) == tp.SliceSpec(0, 1)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vocab_parallel_cross_entropy_at_t1_is_f_cross_entropy(reduction):
    logits = (torch.randn(2, 5, 11) * 40).requires_grad_()
    target = torch.randint(0, 11, (2, 5))
    target[1, 3] = -100
    got = tp.vocab_parallel_cross_entropy(logits, target, reduction=reduction)
    want = F.cross_entropy(logits.transpose(1, 2), target, reduction=reduction)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    g_got, = torch.autograd.grad(got.sum(), logits)
    g_want, = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(g_got, g_want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_of_bf16_logits_is_computed_and_returned_in_fp32():
    logits = torch.randn(4, 16).bfloat16().requires_grad_()
    target = torch.randint(0, 16, (4,))
    loss = tp.vocab_parallel_cross_entropy(logits, target, reduction="mean")
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.float(), target), rtol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_refuses_mismatched_shapes_and_reductions():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 8\) must be target's shape \(2, 4\) plus a last"):
        tp.vocab_parallel_cross_entropy(torch.randn(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        tp.vocab_parallel_cross_entropy(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), reduction="avg")


def test_rng_tracker_streams():
    tracker = tp.get_rng_tracker()
    tracker.reset()
    with pytest.raises(KeyError, match=r"no RNG stream named 'model-parallel-rng' is tracked: call "
                                        r"shardspeed.tensor_parallel.model_parallel_seed\(seed\)"):
        with tracker.fork():
            pass
    tp.model_parallel_seed(5)
    default_draws = torch.rand(3)
    tp.model_parallel_seed(5)
    with tracker.fork():
        forked = torch.rand(3)
    assert torch.equal(torch.rand(3), default_draws)  # the default stream did not see the fork
    assert not torch.equal(forked, default_draws)
    with tracker.fork():
        assert not torch.equal(torch.rand(3), forked)  # the forked stream continues
    torch.manual_seed(5 + 2718)
    assert torch.equal(torch.rand(3), forked)  # tensor-parallel rank 0's stream: seed + 2718 + 0
    with pytest.raises(ValueError, match="'model-parallel-rng' is already tracked"):
        tracker.add(tp.MODEL_PARALLEL_RNG, 9)
    with pytest.raises(ValueError, match="seed 2723 already starts another tracked RNG stream"):
        tracker.add("other", 2723)
    # DeepSpeed's names for the same things
    assert checkpointing.get_cuda_rng_tracker() is tracker
    checkpointing.model_parallel_cuda_manual_seed(5)
    with tracker.fork():
        assert torch.equal(torch.rand(3), forked)


@pytest.mark.parametrize("kept_inputs", [False, True])
def test_checkpoint_replays_forked_dropout(kept_inputs):
    checkpointing.configure(None, checkpoint_in_cpu=kept_inputs)
    lin = nn.Linear(8, 8)

    def region(x):
        with tp.get_rng_tracker().fork():
            return F.dropout(lin(x), 0.5)

    def run(recompute):
        tp.model_parallel_seed(11)
        lin.zero_grad()
        x = torch.randn(4, 8, requires_grad=True)
        y = checkpointing.checkpoint(region, x) if recompute else region(x)
        y.sum().backward()
        with tp.get_rng_tracker().fork():
            return y.detach(), lin.weight.grad.clone(), torch.rand(2)

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_one_rank_unit_and_what_the_engine_reads_from_it():
    mpu = shardspeed.initialize_model_parallel(tensor_parallel_size=1)
    assert comm.get_model_parallel_unit() is mpu and comm.model_parallel_is_initialized()
    assert mpu.topology() == comm.PipeModelDataParallelTopology(1, 1, 1)
    topo = comm.topology_from_mpu(mpu)
    assert (topo.dp_world_size, topo.tp_world_size, topo.pp_world_size, topo.mp_world_size) == (1, 1, 1, 1)
    assert tp.ColumnParallelLinear(4, 2).tp.world_size == 1
    comm.destroy_model_parallel()
    assert comm.get_model_parallel_unit() is None


def test_model_parallel_sizes_are_checked_before_any_group_is_built():
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the world size 1"):
        shardspeed.initialize_model_parallel(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be a positive integer, got 0"):
        shardspeed.initialize_model_parallel(pipeline_parallel_size=0)
    assert comm.get_model_parallel_unit() is None


def test_an_mpu_missing_a_method_is_named():
    class HalfMPU:
        def get_model_parallel_group(self):
            return None

    with pytest.raises(TypeError, match=r"mpu HalfMPU has no get_data_parallel_group\(\): a model parallel unit"):
        comm.topology_from_mpu(HalfMPU())
    with pytest.raises(TypeError, match=r"mpu object has no get_data_parallel_group\(\) and no "
                                        r"get_model_parallel_group\(\)"):
        comm.topology_from_mpu(object())
    with pytest.raises(TypeError, match=r"mpu HalfMPU has no get_tensor_model_parallel_rank\(\)"):
        tp.model_parallel_seed(1, mpu=HalfMPU())


def test_sequence_parallel_and_gathered_output_do_not_mix():
    with pytest.raises(ValueError, match="sequence_parallel=True expects a tensor-parallel consumer; pass "
                                         "gather_output=False"):
        tp.ColumnParallelLinear(4, 4, sequence_parallel=True)
