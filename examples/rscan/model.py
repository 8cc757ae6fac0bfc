"""The RScan-style relevance model: one hashed-vocabulary embedding table shared by both sides, a
bidirectional GRU per side (query, passage), max-pooled, and a small MLP on ``[q, p, q*p, |q-p|]`` giving
one relevance logit per (query, passage) pair.

The table is the model's bulk (``vocab x emb`` parameters, 300k x 64 = 19.2M by default) while a
batch touches a few thousand of its rows; the encoders are tiny (hidden 64). ``sparse=True`` builds the
table with sparse gradients (``torch.sparse_coo`` index slices); with ``sparse=False`` it is an ordinary
dense-gradient table, and ``"sparse_gradients": true`` in the config still reduces it as index slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class RScanConfig:
    vocab: int = 300_000
    emb: int = 64
    hidden: int = 64
    sparse: bool = False


class SideEncoder(nn.Module):
    """Bidirectional GRU over the valid (non-zero) tokens of each row, max-pooled over time."""

    def __init__(self, emb: int, hidden: int):
        super().__init__()
        self.rnn = nn.GRU(emb, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(1).clamp(min=1).cpu()  # an empty row reads its one padding token
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, padding_value=float("-inf"), total_length=ids.shape[1])
        return out.max(dim=1).values


class RScanModel(nn.Module):
    def __init__(self, cfg: RScanConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab, cfg.emb, padding_idx=0, sparse=cfg.sparse)
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.query_encoder = SideEncoder(cfg.emb, cfg.hidden)
        self.passage_encoder = SideEncoder(cfg.emb, cfg.hidden)
        d = 2 * cfg.hidden
        self.head = nn.Sequential(nn.Linear(4 * d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))

    def score(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        """One relevance logit per row: ``queries [B, Lq]``, ``passages [B, Lp]`` -> ``[B]``."""
        q = self.query_encoder(self.embedding(queries), queries)
        p = self.passage_encoder(self.embedding(passages), passages)
        return self.head(torch.cat([q, p, q * p, (q - p).abs()], dim=1)).squeeze(1)

    def forward(self, queries: torch.Tensor, passages: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the logits against ``labels`` (1 relevant, 0 not)."""
        return nn.functional.binary_cross_entropy_with_logits(self.score(queries, passages), labels)
