"""House rules checked mechanically: one module talks to torch.distributed, imports point downward
(import-linter, run by `make lint`), files stay small."""

import pathlib
import re
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[2] / "shardspeed"
DIST_IMPORT = re.compile(r"^\s*(import torch\.distributed|from torch\.distributed|from torch import distributed)", re.M)


def test_only_comm_imports_torch_distributed():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if "comm" not in p.relative_to(PKG).parts and DIST_IMPORT.search(p.read_text())]
    assert offenders == []


def test_files_stay_under_600_lines():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}


def test_import_is_light():
    # nothing compiled or spawned at import; torch.distributed is loaded by torch itself
    code = "import shardspeed, sys; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
