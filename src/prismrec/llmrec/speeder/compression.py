"""MRC (Multimodal Representation Compression): the mixture of modality experts.

:class:`MixtureOfModalityExperts` turns an item's frozen text / image / collaborative embeddings into
``n_item_tokens`` soft tokens in the LLM's input-embedding space, one :class:`ModalityExpert` per modality mixed
by a per-item gate over the modalities the current MPO stage activates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prismrec.llmrec.speeder.config import MODALITIES, Modality, SpeederError


class ModalityExpert(nn.Module):
    """One modality's embedding -> ``n_tokens`` vectors in the LLM's input-embedding space."""

    def __init__(self, in_dim: int, hidden: int, n_tokens: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.n_tokens, self.out_dim = n_tokens, out_dim
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_tokens * out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(*x.shape[:-1], self.n_tokens, self.out_dim)


class MixtureOfModalityExperts(nn.Module):
    """MRC: per-item text / image / collaborative embeddings -> (items, n_tokens, H) soft tokens.

    ``features`` are frozen (buffers, row 0 = padding); with ``learned_collaborative_dim`` the collaborative
    input is instead a learned ID table. ``active`` selects the modalities the gate mixes (MPO stages).
    """

    def __init__(self, features: dict[str, np.ndarray], llm_dim: int, n_tokens: int, hidden: int,
                 dropout: float, token_norm: float, learned_collaborative_dim: int | None = None) -> None:
        super().__init__()
        self.n_tokens, self.llm_dim = n_tokens, llm_dim
        self.n_items = next(iter(features.values())).shape[0] - 1
        dims: dict[str, int] = {}
        for modality in MODALITIES:
            if modality == "collaborative" and learned_collaborative_dim is not None:
                self.id_table = nn.Embedding(self.n_items + 1, learned_collaborative_dim, padding_idx=0)
                nn.init.normal_(self.id_table.weight, std=0.02)
                dims[modality] = learned_collaborative_dim
                continue
            if modality not in features:
                raise SpeederError(f"MRC needs a {modality!r} feature matrix (have {sorted(features)})")
            matrix = torch.as_tensor(np.asarray(features[modality]), dtype=torch.float32)
            if matrix.shape[0] != self.n_items + 1:
                raise SpeederError(f"{modality} features have {matrix.shape[0]} rows; expected {self.n_items + 1}")
            self.register_buffer(f"features_{modality}", matrix)
            dims[modality] = matrix.shape[1]
        self.learned_collaborative = learned_collaborative_dim is not None
        self.experts = nn.ModuleDict({m: ModalityExpert(dims[m], hidden, n_tokens, llm_dim, dropout)
                                      for m in MODALITIES})
        self.gate_norms = nn.ModuleDict({m: nn.LayerNorm(dims[m]) for m in MODALITIES})
        self.gate = nn.Linear(sum(dims.values()), len(MODALITIES))
        nn.init.zeros_(self.gate.weight)  # uniform mixture at the start of every stage's first step
        nn.init.zeros_(self.gate.bias)
        self.token_scale = nn.Parameter(torch.tensor(float(token_norm)))
        self.active: tuple[Modality, ...] = MODALITIES

    def set_active(self, modalities: Sequence[Modality]) -> None:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise SpeederError(f"unknown or empty modalities {list(modalities)}; known: {list(MODALITIES)}")
        self.active = tuple(m for m in MODALITIES if m in modalities)

    def inputs(self, modality: str, ids: torch.Tensor) -> torch.Tensor:
        if modality == "collaborative" and self.learned_collaborative:
            return self.id_table(ids)
        return getattr(self, f"features_{modality}")[ids]

    def gate_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) item ids -> (N, 3) mixture weights over ``MODALITIES`` (0 for inactive ones; rows sum to 1)."""
        parts = []
        for modality in MODALITIES:
            x = self.gate_norms[modality](self.inputs(modality, ids))
            parts.append(x if modality in self.active else torch.zeros_like(x))
        logits = self.gate(torch.cat(parts, dim=-1))
        inactive = torch.tensor([m not in self.active for m in MODALITIES], device=logits.device)
        return torch.softmax(logits.masked_fill(inactive, float("-inf")), dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) item ids -> (N, n_tokens, H)."""
        weights = self.gate_weights(ids)
        out = torch.zeros(ids.shape[0], self.n_tokens, self.llm_dim, device=ids.device)
        for index, modality in enumerate(MODALITIES):
            if modality in self.active:  # inactive experts are skipped, not just weighted by 0 (saves compute)
                out = out + weights[:, index, None, None] * self.experts[modality](self.inputs(modality, ids))
        return F.normalize(out, dim=-1) * self.token_scale
