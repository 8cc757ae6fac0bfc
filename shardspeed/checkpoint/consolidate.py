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
from shardspeed.checkpoint.pieces import fill


def iter_fp32_tensors(ckpt_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) for every parameter, then every buffer and frozen parameter."""
    manifest = files.read_manifest(ckpt_dir)
    writers = [files.load_file(ckpt_dir / n)["pieces"] for n in sorted(manifest["files"]) if n.startswith("rank_")]
    for name, shape in manifest["param_shapes"].items():
        numel = int(torch.Size(shape).numel())
        out = torch.empty(numel, dtype=torch.float32)
        got = 0
        for pieces in writers:  # mmap'd: only this parameter's pages are read
            got += fill(out, 0, [(s, n, v, st) for s, n, v, st, _ in pieces.get(name, [])])
        if got == numel:
            yield name, out.view(shape)
        elif got == 0 and name not in _frozen(ckpt_dir):
            raise CheckpointError(f"checkpoint {ckpt_dir.resolve()} has no values for parameter '{name}'")
    common = files.load_file(ckpt_dir / files.COMMON)
    for name, t in {**common["frozen"], **common["buffers"]}.items():
        yield name, t


def _frozen(ckpt_dir: Path) -> set[str]:
    return set(files.load_file(ckpt_dir / files.COMMON)["frozen"])


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
