"""A few ZeRO-2 steps of the tiny GPT; rank 0 prints the final parameters' fingerprint and losses.
Used to compare a job spread over two hosts with the same job on one."""

import torch

import shardspeed
from tests.distributed.workloads import ODD, micro_slices, model_config, tiny_gpt

torch.set_num_threads(1)
shardspeed.init_distributed()
model = tiny_gpt(**ODD)
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": None,
       "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}, "zero_optimization": {"stage": 2}}
engine, *_ = shardspeed.initialize(model=model, config=cfg)
losses = []
for step in range(3):
    (x, y), = micro_slices(step, engine.topo.dp_rank, engine.dp_world_size, 2, 1, model_config(**ODD))
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
sd = engine.module.state_dict()
if engine.topo.dp_rank == 0:
    fingerprint = sum(float(v.double().sum()) * (i + 1) for i, (_, v) in enumerate(sorted(sd.items())))
    print(f"RESULT world={engine.dp_world_size} fingerprint={fingerprint!r} losses={losses}", flush=True)
