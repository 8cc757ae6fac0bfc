"""PipelineModule in one process: every stage built by ``stage_id=``, chained by hand, against the plain
``nn.Sequential`` of the same layers; partition methods, specs, ties, seeds, names, errors."""

import pytest
import torch
from torch import nn

import shardspeed as deepspeed
from shardspeed.comm import PipeDataParallelTopology
from shardspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from shardspeed.pipe.partition import partition_balanced, partition_uniform


class Counted(nn.Linear):
    """A Linear that counts its real (not meta-device) constructions."""

    built: list[int] = []

    def __init__(self, n_in, n_out, tag=0):
        super().__init__(n_in, n_out)
        if self.weight.device.type != "meta":
            Counted.built.append(tag)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def head(emb, x):  # the output projection tied to the embedding table
    return x @ emb.weight.t()


def gpt_like(d=8, vocab=11, blocks=4):
    return ([TiedLayerSpec("embed", nn.Embedding, vocab, d)]
            + [LayerSpec(Block, d) for _ in range(blocks)]
            + [lambda x: x * 0.5, LayerSpec(nn.LayerNorm, d), TiedLayerSpec("embed", nn.Embedding, vocab, d,
                                                                             forward_fn=head)])


def stages(layers, p, **kw):
    return [PipelineModule(layers, num_stages=p, stage_id=s, **kw) for s in range(p)]


def chain(mods, x):
    for m in mods:
        x = m(x)
    return x


def sequential_of(layers, base_seed=1234):
    """The same layers as one nn.Sequential, built under the seeds seed_layers uses (ties shared)."""
    tied, out = {}, []
    first = {}
    for i, spec in enumerate(layers):
        if isinstance(spec, TiedLayerSpec):
            first.setdefault(spec.key, i)
            if spec.key not in tied:
                torch.manual_seed(base_seed + first[spec.key])
                tied[spec.key] = spec.build()
            module = tied[spec.key]
            out.append(module if spec.forward_fn is None else Apply(spec.forward_fn, module))
        elif isinstance(spec, LayerSpec):
            torch.manual_seed(base_seed + i)
            out.append(spec.build())
        else:
            out.append(Apply(lambda m, x, f=spec: f(x), None))
    return nn.Sequential(*out)


class Apply(nn.Module):
    def __init__(self, fn, module):
        super().__init__()
        self.fn, self.inner = fn, module

    def forward(self, x):
        return self.fn(self.inner, x)

    def _save_to_state_dict(self, *args):  # the shared module is saved under its own index
        pass


# -- partitions -------------------------------------------------------------------------------------------
def test_partition_math():
    assert partition_uniform(10, 4) == [0, 2, 4, 7, 10]  # early stages hold more in flight: keep them light
    assert partition_balanced([1] * 10, 4) == [0, 2, 4, 7, 10]  # not 3/3/3/1: same max, less spread
    assert partition_balanced([100, 1, 1, 100, 1, 1], 2) == [0, 3, 6]
    assert partition_balanced([0, 1, 1, 1, 1, 0, 0], 2) == [0, 3, 7]  # weightless layers spread: 3 + 4
    import itertools
    import random
    rng = random.Random(0)
    for _ in range(300):  # optimal bottleneck against brute force
        n = rng.randint(1, 8)
        p = rng.randint(1, n)
        w = [rng.choice([0, 1, 2, 5, 9]) for _ in range(n)]
        parts = partition_balanced(w, p)
        assert parts[0] == 0 and parts[-1] == n and all(a < b for a, b in zip(parts, parts[1:]))
        best = min(max(sum(w[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                   for cuts in itertools.combinations(range(1, n), p - 1))
        assert max(sum(w[a:b]) for a, b in zip(parts, parts[1:])) == best


def test_partition_methods():
    layers = [LayerSpec(nn.Linear, 40, 40)] + [LayerSpec(nn.Linear, 4, 4) for _ in range(5)]
    assert PipelineModule(layers, num_stages=2, stage_id=0, partition_method="uniform").partitions() == [0, 3, 6]
    assert PipelineModule(layers, num_stages=2, stage_id=0).partitions() == [0, 1, 6]  # 'parameters' is the default
    gpt = gpt_like(blocks=4)
    mod = PipelineModule(gpt, num_stages=2, stage_id=1, partition_method="type:block")
    parts = mod.partitions()
    assert [sum(isinstance(x, LayerSpec) and x.typename is Block for x in gpt[a:b])
            for a, b in zip(parts, parts[1:])] == [2, 2]
    assert mod.num_pipeline_stages() == 2 and isinstance(mod.topology(), PipeDataParallelTopology)


def test_profile_partition_puts_the_slow_layer_alone():
    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64) / 8)

        def forward(self, x):
            for _ in range(60):  # ~25x a Linear layer: far beyond timing noise
                x = torch.tanh(x @ self.w)
            return x

    layers = [LayerSpec(nn.Linear, 64, 64) for _ in range(4)] + [LayerSpec(Slow)] + [LayerSpec(nn.Linear, 64, 64)]
    mod = PipelineModule(layers, num_stages=3, stage_id=0, partition_method="profile",
                         profile_input=torch.randn(256, 64))
    assert mod.partitions() == [0, 4, 5, 6]  # by parameter count it would be [0, 2, 4, 6]
    with pytest.raises(ValueError, match="pass profile_input="):
        PipelineModule(layers, num_stages=2, stage_id=0, partition_method="profile")


def test_stage_owner():
    mod = PipelineModule([LayerSpec(nn.Linear, 2, 2) for _ in range(7)], num_stages=3, stage_id=0,
                         partition_method="uniform")
    assert mod.partitions() == [0, 2, 4, 7]
    assert [mod.stage_owner(i) for i in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    assert list(mod.local_layer_indices()) == [0, 1]
    with pytest.raises(ValueError, match="layer 7 is not in this model of 7 layers"):
        mod.stage_owner(7)


def test_layer_spec_is_built_only_on_its_stage():
    layers = [LayerSpec(Counted, 4, 4, tag=i) for i in range(6)]
    for method in ("uniform", "parameters"):
        for s in range(3):
            Counted.built.clear()
            mod = PipelineModule(layers, num_stages=3, stage_id=s, partition_method=method)
            assert sorted(Counted.built) == list(mod.local_layer_indices()) == [2 * s, 2 * s + 1]
            assert all(p.device.type == "cpu" for p in mod.parameters())
    assert LayerSpec(Counted, 3, 5).count_parameters() == 20


# -- stages against nn.Sequential -------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_stages_chained_equal_sequential(p):
    layers = gpt_like()
    mods = stages(layers, p, seed_layers=True, partition_method="uniform")
    seq = sequential_of(layers)
    ids = torch.randint(0, 11, (3, 5))
    out, ref = chain(mods, ids), seq(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # gradients: a tied weight's gradient is the sum of its stages' (what ReduceTiedGrads computes)
    out.square().mean().backward()
    ref.square().mean().backward()
    seq_grads = {k: v.grad for k, v in seq.named_parameters(remove_duplicate=False)}
    summed = {}
    for m in mods:
        for name, param in m.named_parameters():
            g = m.global_state_name(name)
            summed[g] = summed.get(g, 0) + param.grad
    assert set(summed) <= set(seq_grads)
    for g, grad in summed.items():
        torch.testing.assert_close(grad, seq_grads[g], rtol=1e-6, atol=1e-7)


def test_seed_layers_makes_weights_independent_of_p():
    layers = gpt_like()
    merged = {}
    for p in (1, 2, 3, 4):
        state = {}
        for m in stages(layers, p, seed_layers=True, partition_method="uniform"):
            for k, v in m.global_state_dict().items():
                assert k not in state or torch.equal(state[k], v)  # tied copies start equal on every stage
                state[k] = v
        merged[p] = state
    for p in (2, 3, 4):
        assert merged[p].keys() == merged[1].keys()
        assert all(torch.equal(merged[p][k], merged[1][k]) for k in merged[1])
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    PipelineModule(layers, num_stages=2, stage_id=1, seed_layers=True)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is left alone
    torch.manual_seed(0)
    one = PipelineModule(layers, num_stages=1, stage_id=0, partition_method="uniform").global_state_dict()
    torch.manual_seed(0)
    last = PipelineModule(layers, num_stages=2, stage_id=1, partition_method="uniform").global_state_dict()
    assert any(not torch.equal(one[k], v) for k, v in last.items())  # without it, init depends on P


def test_global_names_move_between_stage_counts_and_sequential():
    layers = gpt_like()
    two = stages(layers, 2, seed_layers=True, base_seed=7, partition_method="uniform")
    saved = {}
    for m in two:
        saved.update(m.global_state_dict())
    assert "0.weight" in saved and "9.weight" not in saved  # the tie is saved once, under its first index
    three = stages(layers, 3, partition_method="uniform")  # other weights, then loaded
    for m in three:
        m.load_global_state_dict(saved)
    ids = torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(chain(three, ids), chain(two, ids), rtol=0, atol=0)
    seq = sequential_of(layers, base_seed=99)
    seq.load_state_dict(saved, strict=False)
    torch.testing.assert_close(seq(ids), chain(two, ids), rtol=0, atol=0)
    fresh = stages(layers, 2, partition_method="uniform")
    for m in fresh:
        m.load_global_state_dict(seq.state_dict())
    torch.testing.assert_close(chain(fresh, ids), chain(two, ids), rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"stage 0 \(layers 0..3\) needs \['0.weight'"):
        fresh[0].load_global_state_dict({})


def test_tied_bookkeeping():
    layers = gpt_like(blocks=4)  # embed at 0, head at 7
    topo = PipeDataParallelTopology(num_pp=3, num_dp=2)
    mods = [PipelineModule(layers, topology=topo, stage_id=s, partition_method="uniform") for s in range(3)]
    assert mods[0].partitions() == [0, 2, 5, 8]
    groups = [m.tied_weight_groups() for m in mods]
    for g in groups:
        (key,) = g
        e = g[key]
        assert (key, e.attrs, e.layer_indices, e.stages, e.owner_stage) == ("embed", ["weight"], [0, 7], [0, 2], 0)
        assert e.global_names == ["0.weight"]
        assert e.rank_lists == [[0, 4], [1, 5]]  # (pipe, data): stage s of replica d is rank 2 s + d
    assert groups[1]["embed"].module is None and groups[1]["embed"].params() == []
    for s in (0, 2):
        e = groups[s]["embed"]
        assert e.params() == [mods[s].tied_modules["embed"].weight]
        assert e.local_names == ["tied_modules.embed.weight"]
        assert dict(mods[s].named_parameters())["tied_modules.embed.weight"] is e.params()[0]
    one = PipelineModule(layers, num_stages=1, stage_id=0)
    assert len(one.tied_modules) == 1 and one.tied_weight_groups()["embed"].stages == [0]
    spec = TiedLayerSpec("t", nn.Linear, 2, 2, tied_weight_attr="bias")
    assert spec.tied_weight_attr == ["bias"]


def test_callables_as_layers_and_tuples_between_them():
    layers = [LayerSpec(nn.Linear, 3, 3), lambda x: (x, x * 2), lambda xy: xy[0] + xy[1], LayerSpec(nn.Linear, 3, 1)]
    mods = stages(layers, 2, seed_layers=True, partition_method="uniform")
    x = torch.randn(4, 3)
    ref = sequential_of(layers)
    torch.testing.assert_close(chain(mods, x), ref(x))
    assert [n for n, _ in mods[0].named_parameters()] == ["0.weight", "0.bias"]


def test_activation_checkpoint_interval():
    layers = [LayerSpec(Block, 6) for _ in range(5)] + [lambda x: x.relu(), lambda x: x * 3]
    calls = []

    def counting(fn, *args):
        calls.append(len(args))
        return deepspeed.checkpointing.checkpoint(fn, *args)

    plain = PipelineModule(layers, num_stages=1, stage_id=0, seed_layers=True)
    ckpt = PipelineModule(layers, num_stages=1, stage_id=0, seed_layers=True, activation_checkpoint_interval=2,
                          activation_checkpoint_func=counting)
    x = torch.randn(3, 6, requires_grad=True)
    a, b = plain(x), ckpt(x)
    torch.testing.assert_close(a, b)
    assert len(calls) == 3  # chunks [0,1] [2,3] [4,relu]; [x*3] has no parameters, so no recompute
    a.sum().backward()
    g = x.grad.clone()
    x.grad = None
    b.sum().backward()
    torch.testing.assert_close(x.grad, g)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    calls.clear()
    only = PipelineModule(layers, num_stages=1, stage_id=0, activation_checkpoint_interval=1,
                          activation_checkpoint_func=counting, checkpointable_layers=["Block"])
    only(x)
    assert len(calls) == 5


def test_mpu_is_the_unit_of_the_same_layout(monkeypatch):
    from shardspeed.comm import PipeModelDataParallelTopology, ProcessTopology

    class Unit:
        def topology(self):
            return PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=2)

    unit = Unit()
    monkeypatch.setattr("shardspeed.pipe.module.get_model_parallel_unit", lambda: unit)
    layers = [LayerSpec(nn.Linear, 2, 2) for _ in range(4)]
    mod = PipelineModule(layers, topology=PipeDataParallelTopology(2, 2), stage_id=1)
    assert mod.mpu() is unit  # (pipe, data) is the (pipe, data, model) grid with model size 1
    swapped = PipelineModule(layers, topology=ProcessTopology(["data", "pipe"], [2, 2]), stage_id=0)
    with pytest.raises(ValueError, match="does not lay ranks out as \\(pipe, data, model\\)"):
        swapped.mpu()


def test_reachable_as_deepspeed_pipe():
    assert deepspeed.pipe.PipelineModule is PipelineModule
    assert deepspeed.pipe.LayerSpec is LayerSpec and deepspeed.pipe.TiedLayerSpec is TiedLayerSpec


# -- errors ------------------------------------------------------------------------------------------------
def test_errors_say_what_and_where(monkeypatch):
    layers = [LayerSpec(nn.Linear, 2, 2) for _ in range(3)]
    with pytest.raises(ValueError, match="3 layers cannot fill 4 pipeline stages"):
        PipelineModule(layers, num_stages=4, stage_id=0)
    with pytest.raises(ValueError, match="num_stages 2 does not divide the world size 1"):
        PipelineModule(layers, num_stages=2)
    monkeypatch.setattr("shardspeed.pipe.module.get_world_size", lambda: 6)
    with pytest.raises(ValueError, match="num_stages 4 does not divide the world size 6"):
        PipelineModule(layers + layers, num_stages=4)
    with pytest.raises(ValueError, match="has 4 ranks but the world has 6"):
        PipelineModule(layers, topology=PipeDataParallelTopology(2, 2))
    with pytest.raises(ValueError, match="unknown partition_method 'balanced'; use 'uniform', 'parameters'"):
        PipelineModule(layers, num_stages=2, stage_id=0, partition_method="balanced")
    with pytest.raises(ValueError, match=r"'type:Block' matches 1 layer\(s\) \[1\] for 2 stages, so stage 0 would "
                                         r"have no layers of that type"):
        PipelineModule([LayerSpec(nn.Linear, 2, 2), LayerSpec(Block, 2), LayerSpec(nn.Linear, 2, 2)],
                       num_stages=2, stage_id=0, partition_method="type:Block")
    with pytest.raises(ValueError, match="needs num_stages=P or topology="):
        PipelineModule(layers)
    with pytest.raises(ValueError, match="stage_id 2 is not a stage of 2"):
        PipelineModule(layers, num_stages=2, stage_id=2)
    with pytest.raises(TypeError, match="layer 1 is a int"):
        PipelineModule([nn.Linear(2, 2), 3], num_stages=1, stage_id=0)
