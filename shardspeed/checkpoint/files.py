"""Checkpoint files on disk: atomic writes, the manifest (sizes and checksums), verification.

[Note: layout of a checkpoint] ``save_dir/TAG/`` holds ``common.pt`` (rank 0: counters, scheduler,
loss scaler, optimizer hyperparameters, module buffers, client state, config), ``rank_R.pt`` (each
writing rank: its pieces of every parameter as (name, flat start, length, fp32 values, optimizer
state slices), its tensor-parallel rank and its RNG states), and ``manifest.json`` (written last:
world size, stage, every parameter's full shape, which parameters are tensor-parallel slices and
how they were cut, and the size and SHA-256 of every file). ``save_dir/latest`` names the newest tag. Everything is
written under a temporary directory name and renamed into place once every rank has finished,
so a crash mid-save leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

# 2: tensor-parallel slices (manifest "tensor_parallel", rank files' "tp_rank") and frozen parameters
# saved as pieces; 1 (no slices, frozen parameters whole in common.pt) still loads
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
COMMON = "common.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, with the file that is wrong."""


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_manifest(tmp_dir: Path, meta: dict[str, Any]) -> None:
    files = {}
    for f in sorted(tmp_dir.iterdir()):
        if f.name != MANIFEST:
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256(f)}
    with open(tmp_dir / (MANIFEST + ".partial"), "w") as fh:
        json.dump({"format_version": FORMAT_VERSION, **meta, "files": files}, fh, indent=1)
    os.replace(tmp_dir / (MANIFEST + ".partial"), tmp_dir / MANIFEST)


def publish(tmp_dir: Path, final_dir: Path, save_dir: Path, tag: str, save_latest: bool) -> None:
    """Move a complete checkpoint into place, then point ``latest`` at it (rank 0 only)."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    if save_latest:
        latest = save_dir / "latest"
        with open(latest.with_name("latest.partial"), "w") as fh:
            fh.write(tag)
        os.replace(latest.with_name("latest.partial"), latest)


def resolve_tag(load_dir: Path, tag: str | None) -> str:
    if tag is not None:
        return tag
    latest = load_dir / "latest"
    if not latest.is_file():
        raise CheckpointError(f"no tag given and no 'latest' file in {load_dir.resolve()}: pass tag=... or save "
                              "with save_latest=True")
    return latest.read_text().strip()


def read_manifest(ckpt_dir: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest, after checking every listed file exists with its size (and checksum)."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path.resolve()} is missing: not a shardspeed checkpoint, or its save did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path.resolve()} is damaged: {e}") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path.resolve()}: format version {manifest.get('format_version')}, expected one of "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    for name, info in manifest["files"].items():
        f = ckpt_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f.resolve()} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"checkpoint file {f.resolve()} is damaged: {f.stat().st_size} bytes, the manifest "
                                  f"says {info['size']}")
        if verify and sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f.resolve()} is damaged: its SHA-256 does not match the manifest")
    return manifest


def load_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code runs from a checkpoint) and mmap, so a big
    file is paged in as it is read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path.resolve()} cannot be read: {e}") from None
