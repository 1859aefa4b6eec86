"""Shared building blocks: attention masks, multi-head attention, the SASRec/BERT4Rec Transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def self_attention_mask(padding_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True where query i may attend to key j.

    Keys that are padding are hidden, except each position may always see itself: with left padding a
    padded query would otherwise have no key at all (a softmax over nothing gives NaN). Padded positions
    never reach a loss or a score, so what they compute does not matter.
    """
    _, length = padding_mask.shape
    device = padding_mask.device
    allowed = (~padding_mask)[:, None, :].expand(-1, length, -1)  # (B, Lq, Lk): key is real
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    return allowed[:, None, :, :]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate query and key/value inputs.

    Used for self-attention (query = key/value sequence) and for cross-attention between views.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, q_len, dim = query.shape
        k_len = key_value.shape[1]
        heads = self.num_heads

        def split(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.view(batch, length, heads, dim // heads).transpose(1, 2)

        q = split(self.q_proj(query), q_len)
        k = split(self.k_proj(key_value), k_len)
        v = split(self.v_proj(key_value), k_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, q_len, dim))


class PointWiseFeedForward(nn.Module):
    """Two position-wise layers with a residual connection (SASRec section III-B)."""

    def __init__(self, dim: int, dropout: float, inner: int | None = None, activation: str = "relu") -> None:
        super().__init__()
        inner = inner or dim
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.GELU() if activation == "gelu" else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout2(self.fc2(self.dropout1(self.activation(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """SASRec's block: pre-LN query, attention with residual, LN, feed-forward with residual."""

    def __init__(self, dim: int, num_heads: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = PointWiseFeedForward(dim, dropout, activation=activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn_dropout(self.attn(q, x, mask))
        x = self.ffn(self.ffn_norm(x))
        return x * keep  # padded positions stay zero
