"""Config loading and the messages a user reads when it is wrong."""

import argparse
import json

import pytest

import shardspeed
from shardspeed.config import ConfigError, config_from_args, load_config, resolve_batch_sizes


def test_any_two_batch_sizes_give_the_third():
    assert resolve_batch_sizes(32, 4, None, 2).gradient_accumulation_steps == 4
    assert resolve_batch_sizes(32, None, 4, 2).train_micro_batch_size_per_gpu == 4
    assert resolve_batch_sizes(None, 4, 4, 2).train_batch_size == 32
    assert resolve_batch_sizes(32, None, None, 2) == resolve_batch_sizes(32, 16, 1, 2)
    assert resolve_batch_sizes(None, 4, None, 2).train_batch_size == 8
    assert resolve_batch_sizes(32, 4, 4, 2).train_batch_size == 32


def test_batch_sizes_that_do_not_add_up_name_all_numbers():
    with pytest.raises(ConfigError) as e:
        resolve_batch_sizes(10, 4, 1, 2)
    assert str(e.value) == ("train_batch_size 10 != train_micro_batch_size_per_gpu 4 * "
                            "gradient_accumulation_steps 1 * data-parallel world size 2")
    with pytest.raises(ConfigError, match="train_batch_size 10 is not divisible by train_micro_batch_size_per_gpu 4"):
        resolve_batch_sizes(10, 4, None, 2)
    with pytest.raises(ConfigError, match="set train_batch_size or train_micro_batch_size_per_gpu"):
        resolve_batch_sizes(None, None, 2, 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be a positive integer, got 0"):
        resolve_batch_sizes(8, None, 0, 1)


@pytest.mark.parametrize("cfg, expected", [
    ({"train_batch_sise": 8}, "unknown config key 'train_batch_sise'. Did you mean 'train_batch_size'?"),
    ({"fp16": {"enabeld": True}}, "unknown config key 'fp16.enabeld'. Did you mean 'enabled'?"),
    ({"zero_optimization": {"stage": 1, "reduce_buket_size": 5}},
     "unknown config key 'zero_optimization.reduce_buket_size'. Did you mean 'reduce_bucket_size'?"),
    ({"gradient_clipping": 1.0, "wall_clock_breakdwn": True},
     "Did you mean 'wall_clock_breakdown'?"),
])
def test_unknown_key_suggests_the_right_one(cfg, expected):
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert expected in str(e.value)


def test_unknown_key_far_from_everything_has_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config({"qqqqqq": 1})
    assert str(e.value) == "unknown config key 'qqqqqq'."


def test_fp16_and_bf16_both_enabled():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true; enable one of them"):
        load_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match="config key 'fp16.loss_scale_window'.*got 'often'"):
        load_config({"fp16": {"loss_scale_window": "often"}})


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"malformed JSON in {path} at line 3" in msg
    assert '"fp16": {"enabled": true,}' in msg


def test_missing_config_file_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path}/nope.json"):
        load_config(tmp_path / "nope.json")


def test_deepspeed_shapes_are_accepted(tmp_path):
    # the seed's GPT-2 config
    seed = {"train_batch_size": 512, "train_micro_batch_size_per_gpu": 16,
            "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "max_grad_norm": 1.0}},
            "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}, "zero_optimization": True}
    cfg = load_config(seed)
    assert cfg.zero_optimization.stage == 1 and cfg.fp16.loss_scale == 0
    assert load_config({"zero_optimization": False}).zero_optimization.stage == 0
    assert load_config({"bfloat16": {"enabled": True}}).bf16.enabled
    assert load_config({"communication_data_type": "bfloat16"}).communication_data_type == "bf16"
    z = load_config({"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}})
    assert z.zero_optimization.stage3_gather_16bit_weights_on_model_save


def test_config_from_args_and_add_config_arguments(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_batch_size": 4}))
    parser = shardspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path), "--local_rank=1"])
    assert args.deepspeed and args.local_rank == 1
    assert config_from_args(args, None).train_batch_size == 4
    with pytest.raises(ConfigError, match="a config was given twice"):
        config_from_args(args, {"train_batch_size": 4})
    with pytest.raises(ConfigError, match="no config: pass initialize"):
        config_from_args(argparse.Namespace(), None)


def test_every_field_is_documented_by_type():
    # every section forbids unknown keys (the "did you mean" path depends on it)
    from shardspeed.config.schema import Section

    for cls in Section.__subclasses__():
        assert cls.model_config["extra"] == "forbid"
