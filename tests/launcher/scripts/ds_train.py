"""A DeepSpeed script, unchanged but for the import."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


import shardspeed as deepspeed  # noqa: E402
from tests.distributed.workloads import micro_slices, tiny_gpt  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
model = tiny_gpt()
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
rank = int(os.environ["RANK"])
assert args.local_rank == rank
for step in range(args.steps):
    for x, y in micro_slices(step, rank, 2, engine.train_micro_batch_size_per_gpu(),
                             engine.gradient_accumulation_steps()):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
checksum = sum(p.double().sum().item() for p in model.parameters())
print(f"checksum {checksum:.12f} steps {engine.global_steps}")
