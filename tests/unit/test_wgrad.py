"""The split backward (shardspeed/activation/wgrad.py): a forward under ``WeightGradQueue.recording()``
gives, after ``backward()`` and ``compute()``, exactly autograd's gradients; before ``compute()`` the
input's gradient is there and the linear weights' are not (nor have their hooks run); regions it cannot
replay (torch's own checkpoint, ``save_on_cpu``) are left to autograd; a Hugging Face model built from
its config, trained the way its users call it, gets the same gradients."""

import weakref

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from shardspeed.activation.wgrad import WeightGradQueue
from shardspeed.checkpointing import checkpoint


class Tied(nn.Module):
    """Linear layers with and without bias, a weight used twice, a functional call with keywords."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(6)
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 6, bias=False)
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        h = self.b(torch.tanh(self.a(self.ln(x))))
        return F.linear(input=F.linear(h, self.w), weight=self.w) + h


def grads(model, x, run, loss=lambda y: y.square().sum()):
    """x's and every parameter's gradient after ``run(model, x)`` and backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    loss(run(model, x)).backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def split(model, x, wrap=lambda m, x: m(x), loss=lambda y: y.square().sum()):
    """Forward under recording, backward (the input half), then ``compute()``; returns (x's gradient
    and which parameters had a gradient before compute(), the gradients after, queued entries)."""
    q = WeightGradQueue()
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with q.recording():
        y = wrap(model, x)
    loss(y).backward()
    before = [x.grad.clone()] + [p.grad is not None for p in model.parameters()]
    queued = len(q)
    q.compute()
    return before, [x.grad] + [p.grad for p in model.parameters()], queued


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 5, 6)])
def test_split_backward_gives_autograds_gradients_and_leaves_weights_to_compute(shape):
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(shape)
    want = grads(model, x, lambda m, x: m(x))
    before, after, queued = split(model, x)
    assert queued == 4  # a, b, and the tied weight twice
    torch.testing.assert_close(before[0], want[0], rtol=1e-6, atol=1e-7)  # the input's gradient comes first
    names = [n for n, _ in model.named_parameters()]
    assert dict(zip(names, before[1:], strict=True)) == {
        "w": False, "ln.weight": True, "ln.bias": True, "a.weight": False, "a.bias": False, "b.weight": False}
    assert_same(after, want)


def test_weight_gradients_accumulate_and_run_their_hooks_in_compute():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(4, 6)
    calls = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=name: calls.append(n))
    q = WeightGradQueue()
    for _ in range(2):  # two micro-batches: the second adds to the first's .grad, as autograd would
        with q.recording():
            y = model(x)
        y.sum().backward()
        assert sorted(calls) == ["ln.bias", "ln.weight"]  # nothing of a, b, w before compute()
        q.compute()
        assert sorted(calls) == ["a.bias", "a.weight", "b.weight", "ln.bias", "ln.weight", "w"]  # w once, summed
        calls.clear()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    model(x).sum().backward()
    assert_same(got, [p.grad for p in model.parameters()])


def test_each_linear_is_handed_to_autograd_with_its_tensors_already_dropped():
    # Note: one product at a time: a linear's queued input and output gradient are gone before its
    # weight's hooks run, and the next linear's are still there (not every product made first)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))  # inputs nobody else holds
    q = WeightGradQueue()
    with q.recording():
        y = model(torch.randn(3, 6, requires_grad=True))
    y.square().sum().backward()
    refs = [(weakref.ref(e[0]), weakref.ref(e[1])) for e in q._queued]  # backward order: model[3], model[1]
    seen = []
    for name, m in (("last", model[3]), ("first", model[1])):
        m.weight.register_post_accumulate_grad_hook(
            lambda p, n=name: seen.append((n, [r() is not None for pair in refs for r in pair])))
    q.compute()
    assert seen == [("last", [False, False, True, True]), ("first", [False, False, False, False])]


@pytest.mark.parametrize("hooked", [None, "a.weight"])
def test_a_gradient_nothing_watches_is_added_in_place_and_the_watched_ones_go_through_autograd(monkeypatch, hooked):
    # Note: in place where nothing watches: with .grad already there (gradient accumulation, the engine's
    # flat buffers) and no hooks, the products are added into the same .grad tensors without autograd;
    # a leaf with a hook is still given to autograd, alone, and its hook runs once
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(4, 6)
    start = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = start[n].clone()
    held = {n: p.grad for n, p in model.named_parameters()}
    hook_calls = []
    if hooked:
        model.get_parameter(hooked).register_post_accumulate_grad_hook(lambda p: hook_calls.append(p))
    q = WeightGradQueue(in_place=True)  # what the pipeline engine asks for
    with q.recording():
        y = model(x)
    y.square().sum().backward()
    roots = []
    backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda r, g: (roots.append(list(r)), backward(r, g))[1])
    q.compute()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[id(r)] for r in rs] for rs in roots] == ([[hooked]] if hooked else [])
    assert len(hook_calls) == (1 if hooked else 0)
    monkeypatch.undo()
    assert all(p.grad is held[n] for n, p in model.named_parameters())  # the tensors that were there, as autograd
    want = {n: g + start[n] for n, g in zip(held, grads(model, x, lambda m, x: m(x))[1:], strict=True)}
    for n, got in held.items():
        torch.testing.assert_close(got, want[n], rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_hooks_on_the_accumulation_node_run_unless_the_owner_asks_for_in_place():
    # Note: in place where nothing watches: a hook on a weight's AccumulateGrad node (DDP's reducer, Megatron-style
    # wrappers) cannot be seen from the tensor, so only a queue built with in_place=True (the pipeline engine's)
    # may add into .grad itself
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    calls = []
    node = lin.weight.view_as(lin.weight).grad_fn.next_functions[0][0]  # held: the hook lives on this node
    node.register_hook(lambda *_: calls.append("weight"))
    for in_place, want in ((False, ["weight"]), (True, [])):
        calls.clear()
        q = WeightGradQueue(in_place=in_place)
        with q.recording():
            y = lin(torch.randn(3, 4, requires_grad=True))
        y.sum().backward()
        q.compute()
        assert calls == want, in_place


def test_no_grad_frozen_and_non_leaf_weights_pass_through():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    q = WeightGradQueue()
    with q.recording(), torch.no_grad():
        lin(torch.randn(2, 4))
    lin.bias.requires_grad_(False)  # a frozen bias: the layer keeps autograd's backward
    with q.recording():
        y = lin(torch.randn(2, 4)) + F.linear(torch.randn(2, 4), lin.weight * 2)  # a computed weight
    y.sum().backward()
    assert len(q) == 0 and lin.weight.grad is not None


def test_checkpointed_regions_recompute_through_the_queue_and_foreign_ones_are_left_alone():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)), torch.randn(3, 5, 6)
    want = grads(model, x, lambda m, x: m(x))
    # shardspeed.checkpointing: the recomputation records again (Note: recomputed regions)
    _, after, queued = split(model, x, lambda m, x: checkpoint(m, x))
    assert queued == 2
    assert_same(after, want)
    # torch's checkpoint called directly (as Hugging Face models do) and save_on_cpu: autograd's backward
    _, after, queued = split(model, x, lambda m, x: torch_checkpoint.checkpoint(m, x, use_reentrant=False))
    assert queued == 0
    assert_same(after, want)

    def offloaded(m, x):
        with torch.autograd.graph.save_on_cpu():
            return m(x)

    _, after, queued = split(model, x, offloaded)
    assert queued == 0
    assert_same(after, want)


def test_bf16_gradients_equal_autograds():
    torch.manual_seed(0)
    model, x = Tied().to(torch.bfloat16), torch.randn(2, 5, 6, dtype=torch.bfloat16)
    want = grads(model, x, lambda m, x: m(x), loss=lambda y: y.float().square().sum())
    _, after, queued = split(model, x, loss=lambda y: y.float().square().sum())
    assert queued == 4
    for g, w in zip(after, want, strict=True):
        assert torch.equal(g, w)


def test_a_hugging_face_model_from_its_config_gets_the_same_gradients():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    q = WeightGradQueue()
    model.zero_grad(set_to_none=True)
    with q.recording():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(q) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer and the head
    q.compute()
    for (name, p), w in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_what_cannot_split_is_left_to_autograd():
    torch.manual_seed(0)
    lin, table = nn.Linear(4, 4), torch.randn(4, 4, requires_grad=True)  # a leaf that is not a parameter
    x = torch.randn(2, 4, requires_grad=True)
    emb = nn.Embedding(5, 4)

    def model(lin, x):
        frozen_input = lin(x.detach())  # no gradient flows to the input: nothing to split, W must still get its own
        received = F.linear(x, table)  # a received activation used as a weight: its gradient goes back with x's
        tied = F.linear(x + emb(torch.tensor([1, 2])), emb.weight)  # the embedding was used first: autograd keeps it
        return frozen_input.sum() + received.sum() + tied.sum()

    q = WeightGradQueue()
    with q.recording():
        y = model(lin, x)
    y.backward()
    assert len(q) == 0 and lin.weight.grad is not None and table.grad is not None
    got = [lin.weight.grad.clone(), table.grad.clone(), emb.weight.grad.clone(), x.grad.clone()]
    for t in (lin.weight, lin.bias, table, emb.weight, x):
        t.grad = None
    model(lin, x).backward()
    assert_same(got, [lin.weight.grad, table.grad, emb.weight.grad, x.grad])


def test_uses_it_cannot_handle_fail_at_the_forward_and_say_how_to_turn_it_off():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    q = WeightGradQueue()
    said = (r'a \(4, 4\) parameter was used by F.linear, which deferred its weight gradient .* and later in the same '
            r'forward by .*square.*"early_grads": false')
    with pytest.raises(RuntimeError, match=said):
        with q.recording():
            (lin(x).sum() + lin.weight.square().sum())  # a weight penalty after the layer: counted twice otherwise
    with pytest.raises(RuntimeError, match=r"a backward ran inside a forward .*\(autograd\.grad in the model"):
        with q.recording():
            torch.autograd.grad(lin(x).sum(), x)
    assert len(q) == 0
    with q.recording():
        y = lin(x)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\)"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_autocast_gradients_match_autograds():
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 5, 6)

    def run(m, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    want = grads(model, x, run, loss=lambda y: y.float().square().sum())
    _, after, queued = split(model, x, run, loss=lambda y: y.float().square().sum())
    assert queued == 4
    for g, w in zip(after, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_a_recomputed_region_decides_as_its_forward_did():
    # the tied weight is used before the checkpointed region (so not deferred there); recomputing the region
    # alone must not defer it either, or the recomputation would save different tensors
    torch.manual_seed(0)
    emb, lin = nn.Embedding(7, 6), nn.Linear(6, 6)

    def run(m, x):
        h = x + emb(torch.tensor([1, 2, 3]))
        return checkpoint(lambda h: F.linear(lin(h), emb.weight), h)

    x = torch.randn(3, 6)
    holder = nn.ModuleList([emb, lin])
    want = grads(holder, x, run)
    _, after, queued = split(holder, x, run)
    assert queued == 1  # lin only
    assert_same(after, want)
