"""Keys the schema accepts for DeepSpeed's sake but shardspeed does not act on: a value that asks for
something we do not do is a ConfigError naming the key (config/unsupported.py, Note: unsupported
keys); the values that mean what we do anyway, as in typical DeepSpeed configs, load."""

import pytest

from shardspeed.config import ConfigError, load_config
from shardspeed.config.unsupported import UNSUPPORTED

# (config, the whole message the user reads)
REJECTED = [
    ({"zero_optimization": {"contiguous_gradients": False}},
     "config key 'zero_optimization.contiguous_gradients' = False is not supported yet: gradients always go "
     "through contiguous flat buckets; remove the key or set it to true"),
    ({"zero_optimization": {"round_robin_gradients": True}},
     "config key 'zero_optimization.round_robin_gradients' = True is not supported yet: reduced gradient shards "
     "are stepped where they are, never copied round-robin; remove the key or set it to false"),
    ({"aio": {"use_gds": True}},
     "config key 'aio.use_gds' = True is not supported yet: the disk tier reads and writes through the host "
     "(zero/swap_io.py); remove the key or set it to false"),
    ({"zero_optimization": {"load_from_fp32_weights": False}},
     "config key 'zero_optimization.load_from_fp32_weights' = False is not supported yet: checkpoints always "
     "restore the fp32 master weights from their saved fp32 values; remove the key or set it to true"),
    ({"zero_optimization": {"ignore_unused_parameters": False}},
     "config key 'zero_optimization.ignore_unused_parameters' = False is not supported yet: parameters that get "
     "no gradient are reduced as zeros, never an error; remove the key or set it to true"),
    ({"sparse_gradients": True},
     "config key 'sparse_gradients' = True is not supported yet: embedding gradients are reduced dense; remove "
     "the key or set it to false"),
    ({"dump_state": True},
     "config key 'dump_state' = True is not supported yet: print the config yourself "
     "(engine.config.model_dump()); remove the key or set it to false"),
    ({"seed": 1234},
     "config key 'seed' = 1234 is not supported yet: call torch.manual_seed(...) before shardspeed.initialize(); "
     "remove the key"),
    ({"wandb": {"enabled": True, "project": "p"}},
     "config key 'wandb.enabled' = True is not supported yet: log with \"tensorboard\" or \"csv_monitor\" "
     "instead; remove the section or set enabled to false"),
    ({"comms_logger": {"enabled": True, "prof_all": False}},
     "config key 'comms_logger.prof_all' = False is not supported yet: the comm log records every op; remove "
     "the key or set it to true"),
    ({"comms_logger": {"enabled": True, "prof_ops": ["all_reduce"]}},
     "config key 'comms_logger.prof_ops' = ['all_reduce'] is not supported yet: the comm log records every op; "
     "remove the key"),
    ({"comms_logger": {"enabled": True, "debug": True}},
     "config key 'comms_logger.debug' = True is not supported yet: use comms_logger.verbose for a line per op; "
     "remove the key or set it to false"),
    ({"flops_profiler": {"enabled": True, "recompute_fwd_factor": 1.0}},
     "config key 'flops_profiler.recompute_fwd_factor' = 1.0 is not supported yet: the profile counts one "
     "forward; remove the key or set it to 0"),
    ({"optimizer": {"type": "Adam", "legacy_fusion": True}},
     "config key 'optimizer.legacy_fusion' = True is not supported yet: remove the key or set it to false"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "config key 'fp16.fp16_master_weights_and_grads' = True is not supported yet: master weights and gradients "
     "are fp32 in fp16 training; remove the key or set it to false"),
    ({"tensor_parallel": {"autotp_size": 2, "tp_overlap_comm": True}},
     "config key 'tensor_parallel.tp_overlap_comm' = True is not supported yet: the row-parallel all-reduce is not "
     "overlapped with computation; remove the key or set it to false"),
    ({"tensor_parallel": {"autotp_size": 2, "dtype": "bf16"}},
     "config key 'tensor_parallel.dtype' = 'bf16' is not supported yet: the compute dtype comes from the \"fp16\" / "
     "\"bf16\" sections; remove the key"),
    ({"tensor_parallel": {"autotp_size": 2, "tp": {"tp_size": 2}}},
     "config key 'tensor_parallel.tensor_parallel' = {'tp_size': 2} is not supported yet: these are inference "
     "settings: the size is autotp_size and the groups come from initialize(mpu=...) or "
     "shardspeed.initialize_model_parallel(); remove the \"tp\" block"),
    ({"tensor_parallel": {"autotp_size": 2, "injection_policy_tuple": ["a", "b"]}},
     "config key 'tensor_parallel.injection_policy_tuple' = ['a', 'b'] is not supported yet: give the plan as "
     "partition_config.layer_specs; remove the key"),
    ({"tensor_parallel": {"autotp_size": 2, "preset_model": "bloom"}},
     "config key 'tensor_parallel.preset_model' = 'bloom' is not supported yet: AutoTP's name rules cover "
     "Llama-style (q/k/v/o_proj, gate/up/down_proj), GPT-2 and BERT models; remove the key, or give "
     "partition_config.layer_specs for others"),
    ({"tensor_parallel": {"autotp_size": 2, "keep_module_on_host": True}},
     "config key 'tensor_parallel.keep_module_on_host' = True is not supported yet: the model is sliced where it "
     "is, then moved to the device by the engine; remove the key or set it to false"),
    ({"tensor_parallel": {"autotp_size": 2, "kernel_inject": True}},
     "config key 'tensor_parallel.replace_with_kernel_inject' = True is not supported yet: no inference kernels are "
     "injected; remove the key or set it to false"),
    ({"tensor_parallel": {"autotp_size": 2, "partition_config": {"lm_head_patterns": ["lm_head"]}}},
     "config key 'tensor_parallel.partition_config.lm_head_patterns' = ['lm_head'] is not supported yet: the LM "
     "head stays whole (replicated); to cut an untied head give a layer_spec with \"partition_type\": \"column\", "
     "\"gather_output\": true; remove the key"),
    ({"tensor_parallel": {"autotp_size": 2, "partition_config": {"embedding_partition_dim": 1}}},
     "config key 'tensor_parallel.partition_config.embedding_partition_dim' = 1 is not supported yet: embeddings "
     "stay whole (replicated); remove the key"),
]


@pytest.mark.parametrize("config, message", REJECTED, ids=[m.split("'")[1] for _, m in REJECTED])
def test_unsupported_value_is_an_error_naming_the_key(config, message):
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value) == message


def test_every_unsupported_key_has_a_message_test():
    assert {m.split("'")[1] for _, m in REJECTED} == {u.key for u in UNSUPPORTED}


def test_several_unsupported_keys_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config({"sparse_gradients": True, "zero_optimization": {"contiguous_gradients": False}})
    lines = str(e.value).splitlines()
    assert [line.split("'")[1] for line in lines] == ["zero_optimization.contiguous_gradients", "sparse_gradients"]


def test_deepspeed_zero3_config_with_neutral_values_loads():
    # DeepSpeed's ZeRO-3 example config (its docs / the Hugging Face integration), offload set to "none".
    cfg = load_config({
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "none", "pin_memory": True},
            "offload_param": {"device": "none", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "round_robin_gradients": False,
            "sub_group_size": 1e9,
            "reduce_bucket_size": 5e8,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
            "load_from_fp32_weights": True,
            "ignore_unused_parameters": True,
            "elastic_checkpoint": False,
            "memory_efficient_linear": False,
        },
        "zero_force_ds_cpu_optimizer": False,
        "sparse_gradients": False,
        "dump_state": False,
        "wandb": {"enabled": False},
        "comms_logger": {"enabled": True, "prof_all": True, "debug": False, "prof_ops": []},
        "flops_profiler": {"enabled": False, "recompute_fwd_factor": 0.0},
        "wall_clock_breakdown": False,
    })
    z = cfg.zero_optimization
    assert z.stage == 3 and z.overlap_comm is True and z.offload_optimizer.device == "none"
    assert z.sub_group_size == 1_000_000_000 and z.stage3_max_reuse_distance == 1_000_000_000


@pytest.mark.parametrize("key, value", [
    ("elastic_checkpoint", True), ("stage3_gather_16bit_weights_on_model_save", False),
    ("memory_efficient_linear", True),
])
def test_keys_whose_every_value_matches_our_behaviour_load(key, value):
    assert getattr(load_config({"zero_optimization": {key: value}}).zero_optimization, key) == value


def test_deepspeed_autotp_config_with_neutral_values_loads():
    # DeepSpeed's AutoTP training tutorial's section, with its other keys at their defaults
    tp = load_config({"tensor_parallel": {"autotp_size": 4, "tp_overlap_comm": False, "keep_module_on_host": False,
                                          "tp": {"tp_size": 1}, "partition_config": {"use_default_specs": True}}})
    assert tp.tensor_parallel.autotp_size == 4 and tp.tensor_parallel.partition_config.layer_specs == []


def test_precision_keys_whose_every_value_matches_our_behaviour_load():
    assert load_config({"fp16": {"enabled": True, "auto_cast": True}}).fp16.auto_cast
    assert not load_config({"bf16": {"enabled": True, "immediate_grad_update": False}}).bf16.immediate_grad_update


def test_sub_group_size_of_a_billion_or_more_means_the_whole_partition():
    for value in (1e9, 2e9, 10**12):
        cfg = load_config({"train_batch_size": 2, "zero_optimization": {"stage": 3, "sub_group_size": value}})
        assert cfg.zero_optimization.sub_group_size == int(value)
