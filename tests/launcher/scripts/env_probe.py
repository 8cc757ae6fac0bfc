"""Prints what a rank sees of its placement and of the environment its launcher propagated."""
import os

keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG", "SITE_SETTING")
print("probe", " ".join(f"{k}={os.environ.get(k, '-')}" for k in keys), flush=True)
