"""Offload: the config keys and their errors, and the disk tier (zero/swap_io.py) in one process."""

import os
import shutil

import pytest
import torch

from shardspeed.config import ConfigError, load_config
from shardspeed.config.schema import AioConfig
from shardspeed.zero.swap_io import ALIGN, SwapFile, aligned_empty, check_directory, check_free_space, direct_io_works


def _zero(**z):
    return load_config({"train_batch_size": 2, "zero_optimization": z}).zero_optimization


def test_deepspeed_offload_keys_and_the_aio_block_load():
    cfg = load_config({
        "train_batch_size": 2,
        "zero_optimization": {
            "stage": 3, "sub_group_size": 1e6,
            "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True,
                                  "buffer_count": 4, "fast_init": False, "ratio": 0.3},
            "offload_param": {"device": "cpu", "pin_memory": True, "buffer_count": 5, "buffer_size": 1e8,
                              "max_in_cpu": 1e9},
        },
        "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 2, "single_submit": False,
                "overlap_events": True},
    })
    z = cfg.zero_optimization
    assert z.offload_optimizer.device == "nvme" and z.offload_optimizer.ratio == 0.3
    assert z.sub_group_size == 1_000_000 and z.offload_param.max_in_cpu == 1_000_000_000
    assert cfg.aio.intra_op_parallelism == 2 and cfg.aio.queue_depth == 32  # thread_count is the alias
    assert load_config({"aio": {"intra_op_parallelism": 3}}).aio.intra_op_parallelism == 3


@pytest.mark.parametrize("zero, message", [
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}},
     "zero_optimization.offload_optimizer.device 'cpu' needs ZeRO stage 1, 2 or 3 (it moves the partitioned "
     "optimizer state), but zero_optimization.stage is 0: set the stage to 1, 2 or 3 or \"device\": \"none\""),
    ({"stage": 2, "offload_param": {"device": "cpu"}},
     "zero_optimization.offload_param.device 'cpu' needs ZeRO stage 3 (it moves stage 3's parameter shards), but "
     "zero_optimization.stage is 2: set the stage to 3 or \"device\": \"none\""),
    ({"stage": 1, "offload_param": {"device": "nvme", "nvme_path": "/x"}},
     "zero_optimization.offload_param.device 'nvme' needs ZeRO stage 3 (it moves stage 3's parameter shards), but "
     "zero_optimization.stage is 1: set the stage to 3 or \"device\": \"none\""),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}},
     "zero_optimization.offload_optimizer.device 'nvme' needs zero_optimization.offload_optimizer.nvme_path: a "
     "directory on a local disk with room for the offloaded state"),
    ({"stage": 3, "sub_group_size": 1e8},
     "config key 'zero_optimization.sub_group_size' = 100000000 applies only with "
     "zero_optimization.offload_optimizer.device 'nvme' (the step then runs sub-group by sub-group, streamed from "
     "disk); in memory the optimizer steps each rank's partition whole: remove the key or set it to 1e9 or more"),
])
def test_offload_where_it_does_not_apply_names_the_key_and_the_stage(zero, message):
    with pytest.raises(ConfigError) as e:
        _zero(**zero)
    assert str(e.value) == message


def test_max_in_cpu_other_than_the_default_is_refused_as_not_implemented():
    # accepted but ignored would be a silent no-op; DeepSpeed's default (1e9) still loads (test above)
    with pytest.raises(ConfigError) as e:
        _zero(stage=3, offload_param={"device": "nvme", "nvme_path": "/x", "max_in_cpu": 1e6})
    assert str(e.value) == (
        "zero_optimization.offload_param.max_in_cpu 1000000 is not implemented: with offload_param.device 'nvme' "
        "every unit's shard goes to disk except units of at most stage3_param_persistence_threshold elements, which "
        "stay in memory; remove the key (or set it to 1e9), and raise stage3_param_persistence_threshold to keep "
        "more parameters in memory")
    assert _zero(stage=3, offload_param={"device": "nvme", "nvme_path": "/x", "max_in_cpu": 1e9}).offload_param


def test_aio_and_offload_numbers_are_checked():
    with pytest.raises(ConfigError, match=r"aio.block_size 5000 must be a multiple of 4096 bytes.*e.g. 4096"):
        load_config({"aio": {"block_size": 5000}})
    with pytest.raises(ConfigError, match=r"zero_optimization.offload_optimizer.ratio.*less than or equal to 1"):
        _zero(stage=2, offload_optimizer={"device": "cpu", "ratio": 1.5})


def test_missing_or_unwritable_nvme_path_names_the_key(tmp_path):
    key = "zero_optimization.offload_optimizer.nvme_path"
    with pytest.raises(ConfigError) as e:
        check_directory(str(tmp_path / "nope"), key)
    assert str(e.value) == (f"{key} '{tmp_path / 'nope'}' does not exist: create the directory (on a local disk "
                            "with room for the offloaded state) or point the key at one that exists")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"{key} '{tmp_path / 'file'}' is not a directory"):
        check_directory(str(tmp_path / "file"), key)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes past permissions; /proc takes no new files from anyone
        locked = "/proc"
    with pytest.raises(ConfigError, match=f"{key} '{locked}' is not writable by this process"):
        check_directory(str(locked), key)


def test_not_enough_disk_says_how_many_bytes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    need = free + 10 * 2**30
    with pytest.raises(ConfigError) as e:
        check_free_space(str(tmp_path), need, "zero_optimization.offload_optimizer.nvme_path", "the optimizer state")
    msg = str(e.value)
    assert msg.startswith(f"zero_optimization.offload_optimizer.nvme_path '{tmp_path}' has ")
    assert f"but the optimizer state needs {need} bytes ({need / 2**30:.2f} GiB)" in msg
    check_free_space(str(tmp_path), 4096, "k", "w")  # room: no error


def test_aligned_buffers_are_aligned():
    for n in (1, 4095, 4097, 3 * ALIGN):
        b = aligned_empty(n)
        assert b.data_ptr() % ALIGN == 0 and b.numel() % ALIGN == 0 and b.numel() >= n


@pytest.mark.parametrize("threads, block", [(1, 4096), (3, 8192)])
def test_swap_file_round_trip_and_no_file_left(tmp_path, threads, block):
    aio = AioConfig(block_size=block, queue_depth=2, thread_count=threads)
    f = SwapFile(str(tmp_path), "t", 0, aio)
    assert os.listdir(tmp_path) == []  # unlinked at once (Note: the swap file)
    data = [torch.randn(n) for n in (1000, 70_001, 5)]
    regions = []
    for t in data:
        buf = aligned_empty(t.numel() * 4)
        buf[:t.numel() * 4].view(torch.float32).copy_(t)
        off = f.allocate(t.numel() * 4)
        f.write(off, buf, t.numel() * 4).wait()
        regions.append(off)
    for t, off in zip(data, regions):
        buf = aligned_empty(t.numel() * 4)
        f.read(off, buf, t.numel() * 4).wait()
        assert torch.equal(buf[:t.numel() * 4].view(torch.float32), t)
    assert f.bytes_written == f.bytes_read == sum(-(-t.numel() * 4 // ALIGN) * ALIGN for t in data)
    f.close()


def test_direct_io_probe_answers_for_a_real_directory(tmp_path):
    # ext4/xfs take O_DIRECT, tmpfs does not; either way the probe answers and leaves nothing behind
    assert direct_io_works(tmp_path) in (True, False)
    assert os.listdir(tmp_path) == []
