"""BERT4Rec: bidirectional Transformer trained by masked-item prediction (Sun et al., CIKM 2019).

Training (cloze): in each user's last ``max_len + 1`` training items, every item is replaced by a mask
with probability ``mask_prob`` (at least one per sequence) and the model predicts the hidden items from
both sides. Scoring: the user's last ``max_len`` items followed by one appended mask; the hidden state at
that final mask position scores every item by a dot product with the (shared) item vectors.

How the mask works with any item encoder. In batches the mask is the id ``n_items + 1`` (one past the
last item). That id never reaches the item encoder: :meth:`MaskedItemRecommender.encode` looks up the
other ids in the encoder, then writes the backbone's learned ``mask_token`` vector into the masked
positions before the backbone runs. So an encoder that only knows items 1..n (an ID table, or
DMESR-style vectors fused from MLLM semantics) plugs in unchanged: build
``MaskedItemRecommender(my_encoder, BERT4RecEncoder(...), max_len, mask_prob)`` or say
``backbone = "bert4rec"`` and use :func:`prismrec.models.backbones.build_recommender`.

Known pitfall (Petrov & Macdonald, RecSys 2022): BERT4Rec is often under-trained; it needs many more
epochs than SASRec and the full softmax loss (``training.loss = "ce"``), which the shipped config uses.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import pad_left
from prismrec.models.backbones.layers import TransformerBlock, self_attention_mask
from prismrec.models.base import (
    IdItemEmbedding,
    ItemEncoder,
    SequenceBackbone,
    SequentialRecommender,
    sample_training_negatives,
)
from prismrec.models.registry import MODELS
from prismrec.options import ModelConfig


class BERT4RecConfig(ModelConfig):
    name: Literal["bert4rec"] = "bert4rec"
    hidden_size: int = Field(128, ge=1)
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    max_len: int = Field(200, ge=1, description="history length read at scoring time (one mask slot is appended)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    mask_prob: float = Field(0.6, gt=0.0, le=1.0, description="probability that a training item is masked")


class BERT4RecEncoder(SequenceBackbone):
    """Bidirectional Transformer over item vectors, with the learned mask vector it is trained with.

    ``max_len`` is the longest *input* (history plus the appended mask slot).
    """

    causal: ClassVar[bool] = False

    def __init__(self, hidden_size: int, num_blocks: int, num_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.mask_token = nn.Parameter(torch.zeros(hidden_size))
        self.positions = nn.Embedding(max_len, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads, dropout, activation="gelu")
                                    for _ in range(num_blocks))
        # BERT's prediction transform before the dot product with item vectors.
        self.head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                  nn.LayerNorm(hidden_size, eps=1e-12))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation: truncated normal (std 0.02) weights, zero biases, unit layer norms."""
        for name, param in self.named_parameters():
            if "norm" in name or name.startswith("head.2"):
                nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        length = item_vectors.shape[1]
        keep = (~padding_mask).unsqueeze(-1).to(item_vectors.dtype)
        positions = torch.arange(length, device=item_vectors.device)
        x = self.input_dropout(self.input_norm(item_vectors + self.positions(positions)[None])) * keep
        mask = self_attention_mask(padding_mask, causal=self.causal)
        for block in self.blocks:
            x = block(x, mask, keep)
        return self.head(x)


def cloze_mask(lengths: np.ndarray, width: int, mask_prob: float, rng: np.random.Generator) -> np.ndarray:
    """(B, width) bool: which real (right-aligned) positions are masked; at least one per non-empty row."""
    real = np.arange(width)[None, :] >= (width - lengths)[:, None]
    chosen = (rng.random((len(lengths), width)) < mask_prob) & real
    empty = ~chosen.any(axis=1) & (lengths > 0)
    if empty.any():  # a row with nothing masked teaches nothing: hide one of its items at random
        rows = np.flatnonzero(empty)
        cols = width - 1 - (rng.random(len(rows)) * lengths[rows]).astype(np.int64)
        chosen[rows, cols] = True
    return chosen


def cloze_batch(sequences: list[np.ndarray], max_len: int, n_items: int, mask_prob: float,
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Cloze examples over the last ``max_len + 1`` items: masked positions hold the id ``n_items + 1`` in
    ``inputs`` and the hidden item in ``targets`` (0 elsewhere), with one sampled negative each."""
    width = max_len + 1
    items = pad_left(sequences, width).numpy()
    lengths = np.minimum([len(s) for s in sequences], width)
    masked = cloze_mask(lengths, width, mask_prob, rng)
    targets = np.where(masked, items, 0)
    inputs = np.where(masked, n_items + 1, items)
    negatives = sample_training_negatives(targets, sequences, n_items, rng)
    return {"inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
            "negatives": torch.from_numpy(negatives)}


class MaskedItemRecommender(SequentialRecommender):
    """Any item encoder + a backbone with a ``mask_token``, trained by cloze, scored at an appended mask."""

    def __init__(self, item_encoder: ItemEncoder, backbone: SequenceBackbone, max_len: int,
                 mask_prob: float) -> None:
        if not isinstance(getattr(backbone, "mask_token", None), nn.Parameter):
            raise TypeError(f"{type(backbone).__name__} has no learned mask_token: it cannot be cloze-trained")
        super().__init__(item_encoder, backbone, max_len)
        self.mask_prob = mask_prob

    @property
    def mask_id(self) -> int:
        return self.n_items + 1

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, where ``mask_id`` marks masked positions -> (B, L, d) hidden states."""
        is_mask = inputs == self.mask_id
        vectors = self.item_encoder(inputs.masked_fill(is_mask, 0))
        mask_token = self.backbone.mask_token.to(vectors.dtype)
        vectors = torch.where(is_mask.unsqueeze(-1), mask_token, vectors)
        return self.backbone(vectors, inputs == 0)

    def user_vectors(self, inputs: torch.Tensor) -> torch.Tensor:
        appended = torch.full((inputs.shape[0], 1), self.mask_id, dtype=inputs.dtype, device=inputs.device)
        return self.encode(torch.cat([inputs, appended], dim=1))[:, -1, :]

    def training_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return cloze_batch(sequences, self.max_len, self.n_items, self.mask_prob, rng)

    # training_loss is SequentialRecommender's: it scores every position that has a target, which for
    # cloze batches are exactly the masked ones.


@MODELS.register("bert4rec")
class BERT4Rec(MaskedItemRecommender):
    Config = BERT4RecConfig

    def __init__(self, config: BERT4RecConfig, n_items: int, item_encoder: ItemEncoder | None = None) -> None:
        encoder = item_encoder or IdItemEmbedding(n_items, config.hidden_size)
        backbone = BERT4RecEncoder(config.hidden_size, config.num_blocks, config.num_heads, config.max_len + 1,
                                   config.dropout)
        super().__init__(encoder, backbone, config.max_len, config.mask_prob)
        self.config = config
        if isinstance(encoder, IdItemEmbedding):
            with torch.no_grad():
                nn.init.trunc_normal_(encoder.embedding.weight, std=0.02, a=-0.04, b=0.04)
                encoder.embedding.weight[0].zero_()

    @classmethod
    def build(cls, config: BERT4RecConfig, split: LeaveOneOutSplit) -> BERT4Rec:
        return cls(config, split.dataset.n_items)

    @classmethod
    def from_state(cls, config: BERT4RecConfig, n_items: int, state: dict[str, torch.Tensor]) -> BERT4Rec:
        model = cls(config, n_items)
        model.load_state_dict(state)
        return model
