"""Consolidate a shardspeed checkpoint (any ZeRO stage, any world size) into plain fp32 tensors.

    python -m shardspeed.utils.zero_to_fp32 CHECKPOINT_DIR OUTPUT_FILE [--tag TAG] [--safetensors]
                                            [--max_shard_size BYTES]
"""

from __future__ import annotations

import argparse
import sys

from shardspeed.checkpoint.consolidate import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
)
from shardspeed.checkpoint.files import CheckpointError

__all__ = ["convert_zero_checkpoint_to_fp32_state_dict", "get_fp32_state_dict_from_zero_checkpoint", "main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardspeed.utils.zero_to_fp32", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir", help="the save_dir given to engine.save_checkpoint (holds 'latest')")
    ap.add_argument("output_file", help="where to write the fp32 state dict, e.g. pytorch_model.bin")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    ap.add_argument("--safetensors", action="store_true", help="write safetensors instead of torch.save format")
    ap.add_argument("--max_shard_size", type=int, default=None, help="split the output into files of at most N bytes")
    args = ap.parse_args(argv)
    try:
        paths = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output_file, tag=args.tag,
                                                           safe_serialization=args.safetensors,
                                                           max_shard_size=args.max_shard_size)
    except CheckpointError as e:
        print(f"zero_to_fp32: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
