"""Pipeline checkpoints that do not fit the model, in one process (a one-stage pipeline engine):
the message names the first layer that differs and how the checkpoint's model was cut."""

import pytest

import shardspeed
from shardspeed.checkpoint import CheckpointError
from tests.distributed import pipe_workloads as pw

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": None,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def _pipe(blocks: int):
    from shardspeed.pipe import PipelineModule

    module = PipelineModule(pw.layers(blocks), num_stages=1, loss_fn=pw.loss_fn)
    return shardspeed.initialize(model=module, config=CONFIG)[0]


def test_a_layer_count_that_differs_names_the_layer(tmp_path):
    _pipe(blocks=3).save_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checkpoint holds a model of 5 layers \(saved by a PipelineModule of 1 "
                                              r"stages, partition \[0, 5\]\), this model has 4: layer 3 differs: the "
                                              r"checkpoint has \['3.fc1.bias', "):
        _pipe(blocks=2).load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model of 5 layers .* this model has 6: layer 4 differs: this model "
                                              r"has \['4.fc1.bias', "):
        _pipe(blocks=4).load_checkpoint(str(tmp_path))


def test_nn_sequential_with_other_layers_names_the_layer(tmp_path):
    _pipe(blocks=3).save_checkpoint(str(tmp_path))
    engine = shardspeed.initialize(model=pw.reference_model(blocks=2), config=CONFIG)[0]
    with pytest.raises(CheckpointError, match=r"this model has 4: layer 3 differs"):
        engine.load_checkpoint(str(tmp_path))
    engine.load_checkpoint(str(tmp_path), load_module_strict=False)  # layers 0-2 are common
