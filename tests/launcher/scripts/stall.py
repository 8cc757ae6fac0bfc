"""Rank 0 keeps reducing; the other ranks do too until told: ``hang`` (rank 1 stops joining and
sleeps), or ``loop`` (everyone reduces for a long time, printing progress; the test cuts the link)."""

import sys
import time

import torch

import shardspeed
from shardspeed import comm

mode = sys.argv[1]
shardspeed.init_distributed()
rank = comm.get_rank()
t = torch.ones(1)
for step in range(10_000):
    if mode == "hang" and rank == 1 and step == 3:
        time.sleep(600)
    comm.all_reduce(t)
    if step % 10 == 0:
        print(f"step {step}", flush=True)
    time.sleep(0.05)
