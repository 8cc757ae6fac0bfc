"""Joins the job's process group and sums each rank's rank: proves the ranks of several nodes meet."""

import os

import torch

import shardspeed
from shardspeed import comm

shardspeed.init_distributed()
t = torch.tensor([float(comm.get_rank())])
comm.all_reduce(t)
print(f"rank {comm.get_rank()} of {comm.get_world_size()} local {os.environ['LOCAL_RANK']} sum {t.item():g}",
      flush=True)
