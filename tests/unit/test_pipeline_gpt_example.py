"""examples/pipeline_gpt: its PipelineModule, every stage built in this process with ``stage_id=`` and
chained by hand, is the plain ``nn.Sequential`` of the same layers: same initial values at any P,
same loss, and the same gradients (the tied embedding/head's summed over the two stages that hold it)."""

import pytest
import torch

from examples.gpt_model import GPTConfig, synthetic_batch
from examples.pipeline_gpt.model import pipeline_gpt, sequential_gpt

CFG = GPTConfig(vocab=37, seq=16, layers=3, hidden=32, heads=4)


@pytest.mark.parametrize("p", [2, 3])
def test_stages_chained_equal_sequential(p):
    x, y = synthetic_batch(0, 3, CFG.seq, CFG.vocab)
    seq, loss_fn = sequential_gpt(CFG)
    ref = loss_fn(seq(x), y)
    ref.backward()
    ref_grads = {n: q.grad for n, q in seq.named_parameters()}

    stages = [pipeline_gpt(CFG, num_stages=p, stage_id=s) for s in range(p)]
    assert stages[0].partitions() == stages[-1].partitions() and len(stages[0].partitions()) == p + 1
    h = x
    for stage in stages:
        h = stage(h)
    loss = stages[-1].loss_fn(h, y)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)

    seen: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, param in stage.named_parameters():
            g = stage.global_state_name(name)
            torch.testing.assert_close(param.detach(), seq.state_dict()[g], rtol=0, atol=0)  # same initial values
            seen[g] = seen[g] + param.grad if g in seen else param.grad.clone()
    assert set(seen) == set(ref_grads)
    for g, grad in seen.items():
        torch.testing.assert_close(grad, ref_grads[g], rtol=1e-5, atol=1e-7, msg=g)
    # the tie is real: the head's stage holds the embedding table and gets a gradient for it
    assert "tied_modules.embed.weight" in dict(stages[-1].named_parameters())
