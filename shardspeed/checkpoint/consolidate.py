"""Full fp32 tensors from a checkpoint, one parameter at a time (streaming: a model larger than
this process's memory converts into bounded shards)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from shardspeed.checkpoint import files
from shardspeed.checkpoint.files import CheckpointError
from shardspeed.checkpoint.pieces import copy_into, layout_for, transfers
from shardspeed.tensor_parallel.meta import SliceSpec


def iter_fp32_tensors(ckpt_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) for every parameter, then every buffer (and, from format-1
    checkpoints, frozen parameter). Tensor-parallel slices are put back in place: the result is
    the unsliced model (pieces.py, Note: slices in checkpoints)."""
    manifest = files.read_manifest(ckpt_dir)
    saved_tp = manifest.get("tensor_parallel") or {"world_size": 1, "sliced": {}}
    writers = []
    for n in sorted(manifest["files"]):
        if n.startswith("rank_"):
            data = files.load_file(ckpt_dir / n)  # mmap'd: only each parameter's pages are read
            writers.append((data["pieces"], data.get("tp_rank", 0)))
    common = files.load_file(ckpt_dir / files.COMMON)
    frozen_v1 = common.get("frozen", {})
    for name, shape in manifest["param_shapes"].items():
        shape = tuple(shape)
        cut = None
        if name in saved_tp["sliced"]:
            dim, stride = saved_tp["sliced"][name]
            cut = layout_for(name, shape, SliceSpec(dim, stride), saved_tp["world_size"], 0)
        numel = int(torch.Size(shape).numel())
        out = torch.empty(numel, dtype=torch.float32)
        saved = [(piece, rank) for pieces, rank in writers for piece in pieces.get(name, ())]
        got = 0
        for k, d, s in transfers((0, numel), None, [(p[0], p[1], rank) for p, rank in saved], cut):
            got += copy_into(out, saved[k][0][2].reshape(-1), d, s)
        if got == numel:
            yield name, out.view(shape)
        elif got or name not in frozen_v1:
            raise CheckpointError(f"checkpoint {ckpt_dir.resolve()} has {got} of the {numel} values of parameter "
                                  f"'{name}'")
    for name, t in {**frozen_v1, **common["buffers"]}.items():
        yield name, t


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None
                                             ) -> dict[str, torch.Tensor]:
    """The whole model as full fp32 tensors (a plain ``state_dict`` for ``module.load_state_dict``)."""
    root = Path(checkpoint_dir)
    return dict(iter_fp32_tensors(root / files.resolve_tag(root, tag)))


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str | os.PathLike, output_file: str | os.PathLike,
                                               tag: str | None = None, safe_serialization: bool = False,
                                               max_shard_size: int | None = None) -> list[str]:
    """Write the consolidated fp32 state dict to ``output_file`` (torch or safetensors format).

    With ``max_shard_size`` (bytes) the output is split into ``stem-00001-of-0000N.ext`` files plus
    an index (``stem.index.json``), holding at most one shard in memory at a time.
    """
    root, out = Path(checkpoint_dir), Path(output_file)
    tensors = iter_fp32_tensors(root / files.resolve_tag(root, tag))
    if safe_serialization:
        from safetensors.torch import save_file

        def write(sd: dict[str, torch.Tensor], path: Path) -> None:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        def write(sd: dict[str, torch.Tensor], path: Path) -> None:
            torch.save(sd, path)
    if max_shard_size is None:
        write(dict(tensors), out)
        return [str(out)]
    current: dict[str, torch.Tensor] = {}
    size = 0
    written: list[tuple[Path, list[str]]] = []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            written.append(_flush(current, out, len(written), write))
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        written.append(_flush(current, out, len(written), write))
    total = len(written)
    paths = []
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = out.with_name(f"{out.stem}-{i + 1:05d}-of-{total:05d}{out.suffix}")
        os.replace(tmp, final)
        paths.append(str(final))
        weight_map.update({n: final.name for n in names})
    with open(out.with_name(f"{out.stem}.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f, indent=1)
    return paths


def _flush(sd: dict[str, torch.Tensor], out: Path, index: int, write) -> tuple[Path, list[str]]:
    tmp = out.with_name(f"{out.stem}.part{index}{out.suffix}")
    write(sd, tmp)
    return tmp, list(sd)
