"""The pipeline engine in one process (one stage): the messages for a data iterator that runs out
mid-batch, an item that is not (inputs, labels), a last stage without a scalar loss, the calls that
belong to train_batch, and ZeRO stage 3."""

import pytest
import torch

import shardspeed
from shardspeed.config import ConfigError
from tests.distributed import pipe_workloads as pw

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": None,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def _engine(loss_fn=pw.loss_fn, **config):
    from shardspeed.pipe import PipelineModule

    module = PipelineModule(pw.layers(), num_stages=1, loss_fn=loss_fn)
    return shardspeed.initialize(model=module, config={**CONFIG, **config})[0]


def test_data_iterator_running_out_names_the_micro_batch():
    engine = _engine()
    with pytest.raises(RuntimeError, match=r"ran out at micro-batch 4 of 4 \(stage 0\).*RepeatingLoader"):
        engine.train_batch(iter(pw.micro_batches(0, 0, 1, 2, 4)[:3]))


def test_items_must_be_inputs_and_labels():
    engine = _engine()
    ids, _ = pw.micro_batches(0, 0, 1, 2, 4)[0]
    with pytest.raises(TypeError, match=r"micro-batch 1 of 4 is a Tensor: .*\(inputs, labels\)"):
        engine.train_batch(iter([ids] * 4))


def test_last_stage_needs_a_scalar_loss():
    engine = _engine(loss_fn=None)
    with pytest.raises(TypeError, match=r"last stage \(0\) must produce a scalar loss .* got Tensor\(2, 4, 64\)"):
        engine.train_batch(iter(pw.micro_batches(0, 0, 1, 2, 4)))


def test_forward_backward_step_point_to_train_batch():
    engine = _engine()
    ids, labels = pw.micro_batches(0, 0, 1, 2, 4)[0]
    for call in (lambda: engine(ids), lambda: engine.backward(torch.ones(())), engine.step):
        with pytest.raises(RuntimeError, match=r"call engine\.train_batch\(data_iter\)"):
            call()


def test_no_iterator_says_how_to_give_one():
    engine = _engine()
    with pytest.raises(ValueError, match=r"pass train_batch\(data_iter\) or call engine.set_dataiterator"):
        engine.train_batch()
    engine.set_dataiterator(shardspeed.RepeatingLoader(pw.micro_batches(0, 0, 1, 2, 4)))
    assert torch.isfinite(engine.train_batch()) and engine.global_steps == 1


def test_zero_stage_3_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"stage 3 is not supported with pipeline parallelism.*use stage 0, 1 or 2"):
        _engine(zero_optimization={"stage": 3})


def test_schedule_is_chosen_by_config_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match=r"pipeline\.schedule': Input should be '1f1b' or 'gpipe' \(got 'pipedream"):
        _engine(pipeline={"schedule": "pipedream"})
    with pytest.raises(ConfigError, match=r"unknown config key 'pipeline\.schedul'\. Did you mean 'schedule'"):
        _engine(pipeline={"schedul": "gpipe"})
    # one stage (p = 1): 1F1B holds one micro-batch at a time, GPipe all m = 4, with equal bytes each
    stats = {}
    for name in ("1F1B", "GPipe"):  # as papers write them
        engine = _engine(pipeline={"schedule": name, "activation_stats": True})
        engine.train_batch(iter(pw.micro_batches(0, 0, 1, 2, 4)))
        stats[name] = engine.pipe_stats()
    assert stats["1F1B"]["schedule"] == "1f1b" and stats["GPipe"]["schedule"] == "gpipe"
    assert [stats[n]["peak_micro_batches"] for n in stats] == [1, 4] == [stats[n]["bound"] for n in stats]
    assert stats["GPipe"]["peak_activation_bytes"] == 4 * stats["1F1B"]["peak_activation_bytes"] > 0
    # bytes only on request (pipe_stats.py, Note: bytes on request); the count either way
    engine = _engine(pipeline={"schedule": "gpipe"})
    engine.train_batch(iter(pw.micro_batches(0, 0, 1, 2, 4)))
    assert (engine.pipe_stats()["peak_micro_batches"], engine.pipe_stats()["peak_activation_bytes"]) == (4, None)
