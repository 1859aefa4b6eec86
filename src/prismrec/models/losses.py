"""Training losses shared by every sequential model."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_one_negative(hidden: torch.Tensor, pos_vectors: torch.Tensor, neg_vectors: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with one sampled negative per position (DMESR Eq. 7, SASRec's loss).

    ``hidden``, ``pos_vectors``, ``neg_vectors``: (B, L, d); ``mask``: (B, L) bool, positions with a target.
    """
    pos_logits = (hidden * pos_vectors).sum(-1)[mask]
    neg_logits = (hidden * neg_vectors).sum(-1)[mask]
    return F.softplus(-pos_logits).mean() + F.softplus(neg_logits).mean()  # -log σ(x) = softplus(-x)


def full_softmax_ce(hidden: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each target against every item (padding column excluded)."""
    logits = hidden[mask] @ item_table.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[mask])
