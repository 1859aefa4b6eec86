"""In-batch cross-modal contrastive alignment (DMESR Eq. 2-3)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AlignmentForm = Literal["paper", "infonce"]


def one_way_contrastive(anchor: torch.Tensor, other: torch.Tensor, temperature: float,
                        form: AlignmentForm = "paper") -> torch.Tensor:
    """DMESR Eq. (2): -1/B sum_i log exp(sim(a_i, o_i)/tau) / sum_k exp(sim(a_i, o_k)/tau).

    ``form="paper"`` follows the paper's denominator, which sums over k != i only (the positive is
    excluded, so the loss can go below zero); ``form="infonce"`` is the standard InfoNCE whose denominator
    includes the positive (a cross-entropy over the batch). ``sim`` is cosine similarity; the paper's
    temperature tau = 2 divides it (section 4.1.3).
    """
    sims = F.normalize(anchor, dim=-1) @ F.normalize(other, dim=-1).T / temperature
    positives = sims.diagonal()
    if form == "infonce":
        return (torch.logsumexp(sims, dim=1) - positives).mean()
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    negatives = torch.logsumexp(sims.masked_fill(eye, float("-inf")), dim=1)
    return (negatives - positives).mean()


def symmetric_contrastive(a: torch.Tensor, b: torch.Tensor, temperature: float,
                          form: AlignmentForm = "paper") -> torch.Tensor:
    """L^(a<->b) = L^1 + L^2: both directions of Eq. (2)."""
    return one_way_contrastive(a, b, temperature, form) + one_way_contrastive(b, a, temperature, form)
