"""Bidirectional cross-attention between two views of the same item sequence (DMESR Eq. 5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from prismrec.models.backbones.layers import self_attention_mask


class CrossAttention(nn.Module):
    """Single-head ``Softmax(Q K^T / sqrt(d)) V`` with Q from one view and K, V from the other.

    W^Q, W^K, W^V in R^{d x d} (no bias, no output projection, no residual: exactly Eq. 5).
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query_view: torch.Tensor, key_view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.w_q(query_view), self.w_k(key_view), self.w_v(key_view)
        logits = (q @ k.transpose(1, 2)) * self.scale
        logits = logits.masked_fill(~mask, float("-inf"))
        return self.dropout(torch.softmax(logits, dim=-1)) @ v


class BidirectionalCrossAttention(nn.Module):
    """Eq. (5) in both directions: the coarse side takes Q from the fine view and K, V from the coarse view;
    the fine side symmetrically.

    Masks: keys that are padding are hidden. For causal backbones (SASRec, GRU4Rec) position t only sees
    positions <= t of the other view: the fused vector at t feeds the prediction of item t + 1, and letting
    it look at later items would leak the answer. For bidirectional backbones (BERT4Rec) the whole
    (unmasked) sequence is visible, as it is to the backbone itself.
    """

    def __init__(self, dim: int, causal: bool, dropout: float = 0.0, residual: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.residual = residual  # not in Eq. 5: keeps each position's own item in its fused vector
        self.to_coarse = CrossAttention(dim, dropout)
        self.to_fine = CrossAttention(dim, dropout)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor,
                padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self_attention_mask(padding_mask, causal=self.causal)[:, 0]  # (B, L, L)
        keep = (~padding_mask).unsqueeze(-1).to(coarse.dtype)
        coarse_hat = self.to_coarse(fine, coarse, mask) * keep
        fine_hat = self.to_fine(coarse, fine, mask) * keep
        if self.residual:
            return coarse + coarse_hat, fine + fine_hat
        return coarse_hat, fine_hat
