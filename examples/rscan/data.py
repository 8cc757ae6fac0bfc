"""RScan's data in miniature: (query, passage) pairs mined from the docstrings of installed Python code,
the way code-search corpora are built.

Source. Every ``def`` with a docstring in the standard library of the running Python and (with
``corpus="stdlib+torch"``, the default) in the installed ``torch`` package, read with ``ast`` (nothing is
imported or executed). Folders named ``test``, ``tests``, ``idle_test``, ``lib2to3``, ``site-packages``
and ``__pycache__`` are skipped; files are visited in sorted order.

Pairs. The query is the function name split into words (``snake_case`` and ``camelCase``:
``get_default_dtype`` -> ``get default dtype``); the relevant passage is the first 48 words of its
docstring. Names with no word of two or more letters, dunders, and a docstring seen before (the first
occurrence in file order wins) are dropped, so a passage appears once.

Split. A pair is held out when a stable hash (BLAKE2b) of its passage text falls in the lowest 10 % of
hash values: the same split on every machine, rank and run, independent of file order.

Negatives. Training: each query is scored against its own passage and one passage of another training
pair, drawn from a generator seeded by (seed, step). Held-out: each held-out query against its passage
and ``EVAL_NEGATIVES`` passages of other held-out pairs, fixed once. Labels 1 / 0; AUC over all scores.

Tokens. Words are ``[a-z0-9]+`` runs after splitting camelCase and lower-casing, hashed with BLAKE2b into
ids ``1..vocab-1`` (0 is padding): no vocabulary file, any vocabulary size, collisions accepted, as in
feature hashing.

Size on Python 3.11.7 with torch 2.13.0+cpu (train.py prints it): ``stdlib+torch`` 16,241 pairs (14,647
train, 1,594 held out; parsing takes ~20 s once, then a JSON cache under ``~/.cache/shardspeed`` loads in
0.1 s), ``stdlib`` 5,752 pairs (5,178 / 574; ~3 s). Another Python or torch version gives another
(equally deterministic) corpus, and another cache file.

Examples: query ``get index from node``, passage ``extract the index from a getitem node``; query ``read``,
passage ``return size bytes from the stream``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
import tempfile
from dataclasses import dataclass

import torch

SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "site-packages", "__pycache__"}
QUERY_LEN, PASSAGE_LEN = 8, 48
HELD_OUT_PERCENT = 10
MINING_VERSION = 1
EVAL_NEGATIVES = 4
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str


def words(text: str) -> list[str]:
    """Lower-cased ``[a-z0-9]+`` words, camelCase split first (``getItem_at`` -> get, item, at)."""
    return _WORD.findall(_CAMEL.sub(" ", text).lower())


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def token_id(word: str, vocab: int) -> int:
    """The row of ``word`` in a table of ``vocab`` rows: 1..vocab-1 (0 is padding)."""
    if vocab < 2:
        raise ValueError(f"vocab {vocab}: a hashed vocabulary needs at least 2 rows (row 0 is padding)")
    return 1 + _stable_hash(word) % (vocab - 1)


def encode(text: str, length: int, vocab: int) -> list[int]:
    """Hashed ids of the first ``length`` words of ``text``, right-padded with 0."""
    ids = [token_id(w, vocab) for w in words(text)[:length]]
    return ids + [0] * (length - len(ids))


def is_held_out(pair: Pair) -> bool:
    return _stable_hash("split:" + pair.passage) % 100 < HELD_OUT_PERCENT


def source_roots(corpus: str) -> list[str]:
    roots = [sysconfig.get_paths()["stdlib"]]
    if corpus == "stdlib+torch":
        roots.append(os.path.dirname(torch.__file__))
    elif corpus != "stdlib":
        raise ValueError(f"corpus '{corpus}': expected 'stdlib' or 'stdlib+torch'")
    return roots


def _pairs_in(source: str) -> list[Pair]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        query = words(node.name)
        if not doc or not any(len(w) >= 2 and w.isalpha() for w in query):
            continue
        passage = " ".join(words(doc)[:PASSAGE_LEN])
        if passage:
            out.append(Pair(" ".join(query), passage))
    return out


def mine_pairs(roots: list[str]) -> list[Pair]:
    """The pairs of every ``.py`` file under ``roots``, in sorted file order, passages deduplicated."""
    seen, pairs = set(), []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    source = f.read()
                for p in _pairs_in(source):
                    if p.passage not in seen:
                        seen.add(p.passage)
                        pairs.append(p)
    return pairs


def load_pairs(corpus: str = "stdlib+torch", cache_dir: str | None = None) -> list[Pair]:
    """``mine_pairs`` of the corpus, cached as JSON (keyed by Python and torch versions; written to a
    temporary name and renamed, so ranks that build it at once do not see half a file)."""
    import sys

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "shardspeed")
    py = ".".join(str(v) for v in sys.version_info[:3])
    # MINING_VERSION and PASSAGE_LEN: a change to how pairs are mined must not read an old cache
    key = f"rscan_v{MINING_VERSION}_{corpus}_p{PASSAGE_LEN}_py{py}_torch{torch.__version__}"
    path = os.path.join(cache_dir, key.replace("+", "_") + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return [Pair(q, p) for q, p in json.load(f)]
    pairs = mine_pairs(source_roots(corpus))
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump([[p.query, p.passage] for p in pairs], f)
    os.replace(tmp, path)
    return pairs


def split(pairs: list[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(train, held_out), each in corpus order."""
    train = [p for p in pairs if not is_held_out(p)]
    held = [p for p in pairs if is_held_out(p)]
    return train, held


class RScanData:
    """Encoded pairs as tensors: ``queries [N, QUERY_LEN]`` and ``passages [N, PASSAGE_LEN]`` (int64)."""

    def __init__(self, pairs: list[Pair], vocab: int):
        if not pairs:
            raise ValueError("RScanData: no pairs (is the corpus empty?)")
        self.pairs = pairs
        self.queries = torch.tensor([encode(p.query, QUERY_LEN, vocab) for p in pairs], dtype=torch.long)
        self.passages = torch.tensor([encode(p.passage, PASSAGE_LEN, vocab) for p in pairs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.pairs)

    def train_batch(self, step: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global batch ``step``: ``size`` queries, each with its passage (label 1) and another pair's
        passage (label 0); returns (queries [2*size, Lq], passages [2*size, Lp], labels [2*size]) with the
        positive and negative of query i at rows 2i and 2i+1, so a contiguous slice per rank keeps them
        together. Epochs are reshuffled permutations; the same on every rank."""
        n = len(self)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        start = step * size
        idx = torch.cat([self._epoch_order(seed, e) for e in range(start // n, (start + size - 1) // n + 1)])
        idx = idx[start % n: start % n + size]
        neg = (idx + torch.randint(1, n, (size,), generator=g)) % n  # never the query's own passage
        q = self.queries[idx].repeat_interleave(2, dim=0)
        p = torch.stack([self.passages[idx], self.passages[neg]], dim=1).flatten(0, 1)
        y = torch.tensor([1.0, 0.0]).repeat(size)
        return q, p, y

    def _epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 7919 + epoch))

    def eval_set(self, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (or the first ``limit``) held-out query against its passage and ``EVAL_NEGATIVES``
        others: (queries, passages, labels), fixed by ``seed``."""
        n = len(self) if limit is None else min(limit, len(self))
        g = torch.Generator().manual_seed(seed + 12345)
        idx = torch.arange(n)
        negs = (idx[:, None] + torch.randint(1, len(self), (n, EVAL_NEGATIVES), generator=g)) % len(self)
        cols = torch.cat([idx[:, None], negs], dim=1)
        q = self.queries[idx].repeat_interleave(1 + EVAL_NEGATIVES, dim=0)
        p = self.passages[cols.flatten()]
        y = torch.tensor([1.0] + [0.0] * EVAL_NEGATIVES).repeat(n)
        return q, p, y


def describe(train: list[Pair], held: list[Pair]) -> str:
    return f"{len(train) + len(held)} (query, passage) pairs: {len(train)} train, {len(held)} held out"
