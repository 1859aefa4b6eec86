"""The small interfaces every recommender in prismrec implements.

* :class:`ItemEncoder` turns item ids into vectors. The plain one is an ID embedding table; enhanced
  models (DMESR, the baselines) plug in encoders built from MLLM-derived semantics instead.
* :class:`SequenceBackbone` turns a sequence of item *vectors* into one hidden state per position
  (SASRec, BERT4Rec, GRU4Rec): it never sees ids, so any item encoder can feed any backbone.
* :class:`Recommender` is what the trainer and the evaluators talk to: ``training_batch``,
  ``training_loss`` and ``score``. :class:`SequentialRecommender` glues an item encoder and a backbone
  together with next-item training (every position predicts the following item).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import ScoreFactors, pad_left
from prismrec.models.losses import bce_one_negative, full_softmax_ce, sampled_softmax_ce
from prismrec.options import ModelConfig


class ItemEncoder(nn.Module):
    """Item ids (any shape) -> vectors (same shape + (dim,)); id 0 is padding."""

    dim: int
    n_items: int

    def all_items(self) -> torch.Tensor:
        """(n_items + 1, dim) table of every item's vector, row 0 = padding."""
        return self(torch.arange(self.n_items + 1, device=self.device_hint()))

    def device_hint(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


class IdItemEmbedding(ItemEncoder):
    """A learned embedding per item id (the "ID embedding" of plain sequential recommenders)."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.dim = dim
        self.embedding = nn.Embedding(n_items + 1, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def all_items(self) -> torch.Tensor:
        return self.embedding.weight


class SequenceBackbone(nn.Module):
    """(B, L, d) item vectors + (B, L) padding mask (True = padding) -> (B, L, d) hidden states."""

    causal: ClassVar[bool] = True

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Recommender(nn.Module):
    """What the trainer and the evaluators need from a model."""

    Config: ClassVar[type[ModelConfig]]
    trainable: ClassVar[bool] = True
    max_len: int

    @classmethod
    def build(cls, config: Any, split: LeaveOneOutSplit) -> Recommender:
        raise NotImplementedError

    @classmethod
    def from_state(cls, config: Any, n_items: int, state: dict[str, torch.Tensor]) -> Recommender:
        """Rebuild the model for inference from its config and saved weights alone (no dataset, no
        semantics artefact: frozen tables are buffers inside ``state``), then load ``state``."""
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt from saved weights yet")

    def training_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_loss(self, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
        raise NotImplementedError

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def score_factors(self, inputs: torch.Tensor) -> ScoreFactors | None:
        """``score(inputs, None)`` as a sum of user x item dot products, which full ranking streams over the
        catalogue in chunks; None when the model's scores do not factor so (then it scores candidate chunks)."""
        return None


def sample_training_negatives(targets: np.ndarray, sequences: list[np.ndarray], n_items: int,
                              rng: np.random.Generator) -> np.ndarray:
    """One uniform negative per target position, never an item of that user's training sequence."""
    negatives = rng.integers(1, n_items + 1, size=targets.shape)
    for row, seq in enumerate(sequences):
        seen = np.unique(seq)
        clash = np.isin(negatives[row], seen)
        while clash.any():
            negatives[row, clash] = rng.integers(1, n_items + 1, size=int(clash.sum()))
            clash = np.isin(negatives[row], seen)
    return np.where(targets > 0, negatives, 0)


def next_item_batch(sequences: list[np.ndarray], max_len: int, n_items: int,
                    rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Next-item training examples: position t of ``inputs`` predicts ``targets[t]`` (the item after it),
    with one sampled ``negatives[t]`` for the BCE loss (0 where there is no target)."""
    inputs = pad_left([s[:-1] for s in sequences], max_len)
    targets = pad_left([s[1:] for s in sequences], max_len)
    negatives = sample_training_negatives(targets.numpy(), sequences, n_items, rng)
    return {"inputs": inputs, "targets": targets, "negatives": torch.from_numpy(negatives)}


class SequentialRecommender(Recommender):
    """Item encoder + backbone, trained to predict the next item at every position."""

    def __init__(self, item_encoder: ItemEncoder, backbone: SequenceBackbone, max_len: int) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.backbone = backbone
        self.max_len = max_len

    @property
    def n_items(self) -> int:
        return self.item_encoder.n_items

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids -> (B, L, d) hidden states."""
        return self.backbone(self.item_encoder(inputs), inputs == 0)

    def output_items(self) -> torch.Tensor:
        """Vectors items are scored with (shared with the input embedding, as in SASRec)."""
        return self.item_encoder.all_items()

    def user_vectors(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)[:, -1, :]

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        users = self.user_vectors(inputs)
        table = self.output_items()
        if candidates is None:
            return users @ table.T
        return torch.einsum("bd,bcd->bc", users, table[candidates])

    def score_factors(self, inputs: torch.Tensor) -> ScoreFactors:
        return ScoreFactors((self.user_vectors(inputs),), (self.output_items(),))

    def training_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return next_item_batch(sequences, self.max_len, self.n_items, rng)

    def training_loss(self, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
        hidden = self.encode(batch["inputs"])
        mask = batch["targets"] > 0
        if loss == "sampled_ce":  # only the targets' and the draws' vectors: never the whole catalogue
            return sampled_softmax_ce(hidden, self.item_encoder(batch["targets"]),
                                      self.item_encoder(batch["sampled_ids"]), batch["targets"],
                                      batch["sampled_ids"], batch["sampled_logq"], mask)
        table = self.output_items()
        if loss == "ce":
            return full_softmax_ce(hidden, table, batch["targets"], mask)
        return bce_one_negative(hidden, table[batch["targets"]], table[batch["negatives"]], mask)
