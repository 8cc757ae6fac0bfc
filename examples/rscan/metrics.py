"""ROC AUC as the Mann-Whitney statistic: the probability that a random positive scores above a random
negative, ties counting one half. O(n log n) through average ranks."""

from __future__ import annotations

import torch


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC of ``scores`` (higher = more relevant) for binary ``labels`` (1 relevant, 0 not)."""
    scores, labels = scores.detach().double().flatten(), labels.detach().flatten()
    if scores.shape != labels.shape:
        raise ValueError(f"auc: {scores.numel()} scores for {labels.numel()} labels")
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc: needs positives and negatives, got {n_pos} positive and {n_neg} negative labels")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.double)
    # tied scores share the mean of their ranks
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
