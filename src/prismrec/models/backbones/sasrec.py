"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

Item vectors are scaled by sqrt(d), learned absolute positions are added, then ``num_blocks`` causal
Transformer blocks (pre-LN attention, point-wise feed-forward, residuals, dropout) and a final layer norm
produce one hidden state per position; the state at position t scores the item at t + 1 by a dot
product with the (shared) item embeddings. Training: BCE with one sampled negative per position
(DMESR paper Eq. 7) or full softmax cross-entropy.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.models.backbones.layers import TransformerBlock, self_attention_mask
from prismrec.models.base import IdItemEmbedding, ItemEncoder, SequenceBackbone, SequentialRecommender
from prismrec.models.registry import MODELS
from prismrec.options import ModelConfig


class SASRecConfig(ModelConfig):
    name: Literal["sasrec"] = "sasrec"
    hidden_size: int = Field(128, ge=1)
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    max_len: int = Field(200, ge=1, description="longest history the model reads (MovieLens averages 165)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class SASRecEncoder(SequenceBackbone):
    """The SASRec stack over item vectors; usable under any item encoder."""

    causal: ClassVar[bool] = True

    def __init__(self, hidden_size: int, num_blocks: int, num_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.positions = nn.Embedding(max_len, hidden_size)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden_size, eps=1e-8)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        length = item_vectors.shape[1]
        keep = (~padding_mask).unsqueeze(-1).to(item_vectors.dtype)
        positions = torch.arange(length, device=item_vectors.device)
        x = item_vectors * math.sqrt(self.hidden_size) + self.positions(positions)[None]
        x = self.input_dropout(x) * keep
        mask = self_attention_mask(padding_mask, causal=self.causal)
        for block in self.blocks:
            x = block(x, mask, keep)
        return self.final_norm(x)


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal for every weight matrix and embedding (as the reference SASRec implementation)."""
    for name, param in module.named_parameters():
        if param.dim() >= 2 and "norm" not in name:
            nn.init.xavier_normal_(param)
        elif name.endswith("bias"):
            nn.init.zeros_(param)


@MODELS.register("sasrec")
class SASRec(SequentialRecommender):
    Config = SASRecConfig

    def __init__(self, config: SASRecConfig, n_items: int, item_encoder: ItemEncoder | None = None) -> None:
        encoder = item_encoder or IdItemEmbedding(n_items, config.hidden_size)
        backbone = SASRecEncoder(config.hidden_size, config.num_blocks, config.num_heads, config.max_len,
                                 config.dropout)
        super().__init__(encoder, backbone, config.max_len)
        self.config = config
        xavier_init(self)
        if isinstance(encoder, IdItemEmbedding):
            with torch.no_grad():
                encoder.embedding.weight[0].zero_()

    @classmethod
    def build(cls, config: SASRecConfig, split: LeaveOneOutSplit) -> SASRec:
        return cls(config, split.dataset.n_items)

    @classmethod
    def from_state(cls, config: SASRecConfig, n_items: int, state: dict[str, torch.Tensor]) -> SASRec:
        model = cls(config, n_items)
        model.load_state_dict(state)
        return model
