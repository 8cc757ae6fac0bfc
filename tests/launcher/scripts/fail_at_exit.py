"""Rank 0 finishes at once and waits in the exit rendezvous; rank 1 raises once rank 0 is waiting there
(it reads the rendezvous count: no sleep), so rank 0 must learn of the failure from the store."""

import time

import torch.distributed as dist

import shardspeed
from shardspeed import comm

shardspeed.init_distributed()
if comm.get_rank() == 1:
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + 30
    while store.add("shardspeed/exit/1", 0) < 1:  # rank 0 has arrived at exit
        assert time.monotonic() < deadline, "rank 0 never reached exit"
        time.sleep(0.01)
    raise ValueError("bad batch on rank 1")
print("rank 0 done", flush=True)
