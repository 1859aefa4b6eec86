"""Ranking metrics computed on tensors for a whole batch of users at once.

Ties count against the positive: its rank is the number of *other* candidates scoring at least as high,
so a model that scores everything equally is ranked last, never first.
"""

from __future__ import annotations

import torch


def rank_of_positive(scores: torch.Tensor, positive_index: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based pessimistic rank of the positive in each row.

    ``scores``: (B, C). ``positive_index``: (B,) column of the positive (default: column 0).
    ``valid``: optional (B, C) bool mask of candidates that take part (the positive must be valid).
    """
    if positive_index is None:
        positive_index = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    pos = scores.gather(1, positive_index.view(-1, 1))
    at_least = scores >= pos
    if valid is not None:
        at_least &= valid
    # NaN scores compare False; a NaN positive must not look perfect, so rank it last.
    ranks = at_least.sum(dim=1) - 1
    worst = (valid.sum(dim=1) - 1) if valid is not None else torch.full_like(ranks, scores.shape[1] - 1)
    return torch.where(torch.isnan(pos.squeeze(1)), worst, ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user Hit@K, NDCG@K and MRR@K (one positive per user) from 0-based ranks."""
    ranks = ranks.to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = ranks < k
        out[f"hit@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1.0), torch.zeros_like(ranks))
    out["mrr"] = 1.0 / (ranks + 1.0)
    return out
