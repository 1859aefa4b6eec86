"""Training losses shared by every sequential model."""

from __future__ import annotations

import numpy as np
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


class NegativeSampler:
    """Draws the negatives of the sampled softmax (``training.loss = "sampled_ce"``), with replacement, from
    item ids 1..n: uniformly, or in proportion to ``counts + 1`` (training popularity; the +1 keeps every item
    drawable, so the logQ-corrected estimate of the softmax denominator stays unbiased).

    :meth:`draw` returns the ids and ``log(N q_j)``, the logQ correction: subtracted from a sampled item's logit,
    ``sum_s exp(o_s - log(N q_s))`` over the N draws estimates ``sum_j exp(o_j)`` over the whole catalogue.
    """

    def __init__(self, n_items: int, kind: str = "uniform", counts: np.ndarray | None = None) -> None:
        if n_items < 1:
            raise ValueError("the sampled softmax needs at least one item")
        self.n_items = n_items
        self.kind = kind
        if kind == "uniform":
            self.cdf: np.ndarray | None = None
            self.log_q = np.full(n_items, -np.log(n_items))
        elif kind == "popularity":
            if counts is None or len(counts) != n_items + 1:
                raise ValueError(f"popularity negatives need counts for ids 0..{n_items} (got "
                                 f"{None if counts is None else len(counts)})")
            weights = np.asarray(counts[1:], dtype=np.float64) + 1.0
            q = weights / weights.sum()
            self.cdf = np.cumsum(q)
            self.cdf[-1] = 1.0
            self.log_q = np.log(q)
        else:
            raise ValueError(f"unknown negative sampler {kind!r}: uniform or popularity")

    def draw(self, num: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` item ids (int64) and their ``log(num * q)`` (float32)."""
        if self.cdf is None:
            index = rng.integers(0, self.n_items, size=num)
        else:
            index = np.minimum(np.searchsorted(self.cdf, rng.random(num), side="right"), self.n_items - 1)
        logq = (self.log_q[index] + np.log(num)).astype(np.float32)
        return torch.from_numpy(index + 1), torch.from_numpy(logq)


def sampled_softmax_ce(hidden: torch.Tensor, target_vectors: torch.Tensor, sampled_vectors: torch.Tensor,
                       targets: torch.Tensor, sampled_ids: torch.Tensor, sampled_logq: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each target against N sampled items shared by the batch's positions, with the
    logQ correction (Jean et al. 2015; the sampled softmax of gSASRec's and Klenitskiy & Vasilev's studies).

    ``hidden``, ``target_vectors``: (B, L, d); ``sampled_vectors``: (N, d) for ``sampled_ids`` (N,), drawn with
    ``sampled_logq`` = log(N q) (:class:`NegativeSampler`); ``mask``: (B, L) positions with a target. A draw
    equal to a position's target (an accidental hit) is left out of that position's denominator, so as N grows
    the loss approaches :func:`full_softmax_ce`.
    """
    h = hidden[mask]
    pos = (h * target_vectors[mask]).sum(-1, keepdim=True)
    neg = h @ sampled_vectors.T - sampled_logq.to(h.dtype)
    hits = targets[mask].view(-1, 1) == sampled_ids.view(1, -1)
    neg = neg.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos, neg], dim=1).float()
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
