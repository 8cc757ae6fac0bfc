"""What the launch benchmark starts: join the process group, take one tiny step, and have rank 0
print the wall-clock time when the first step is done. Plain torch.distributed, so the launchers are
compared, not libraries."""

import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1000)
dist.all_reduce(t)
if dist.get_rank() == 0:
    print(f"FIRST_STEP_AT {time.time():.6f} world={dist.get_world_size()}", flush=True)
dist.barrier()
dist.destroy_process_group()

