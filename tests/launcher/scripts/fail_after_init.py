"""Rank 1 fails after joining the process group, as argv[-1] says ("raise", "exit" or "clean"), while
rank 0 waits for it in an all_reduce it will never join."""

import os
import sys

import torch

import shardspeed
from shardspeed import comm

mode = sys.argv[-1]
shardspeed.init_distributed()
if comm.get_rank() == 1 and mode == "raise":
    raise ValueError("bad batch on rank 1")
if comm.get_rank() == 1 and mode == "exit":
    sys.exit(3)
t = torch.ones(1)
comm.all_reduce(t)
print(f"rank {os.environ['RANK']} done sum {t.item():g}", flush=True)
