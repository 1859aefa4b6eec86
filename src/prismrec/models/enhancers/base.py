"""What the item-side enhancer baselines (CPMM, QARM, X-REFLECT) share.

Each baseline is an :class:`~prismrec.models.base.ItemEncoder` built from a semantics artefact (the same
one DMESR reads) plugged into a named backbone by :func:`~prismrec.models.backbones.build_recommender`, so
it is trained the way that backbone is trained (next-item for SASRec and GRU4Rec, cloze with the learned
mask vector for BERT4Rec). :class:`EnhancedRecommender` wraps that recommender (``self.inner``) and adds
the baseline's own auxiliary losses and batch fields; scoring is the inner recommender's.

Shared options (:class:`EnhancerConfig`): the backbone's shape, and ``id_embedding`` (default ``False``).
The baselines' papers *replace* the ID embedding by the semantic item vector, so by default an item is only
its semantics. With ``id_embedding = true`` every baseline's item encoder also holds a learned
``nn.Embedding(n_items + 1, hidden_size)`` (row 0 = padding) and adds the item's row to its semantic vector,
``e_i = f(semantics_i) + id_i``, as DMESR's option of the same name does; the ID rows are trained with the
rest and saved in the weights (``...item_encoder.id_embedding.weight``), and for QARM they also tell apart
items whose quantised codes coincide.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from prismrec.evaluation.evaluators import ScoreFactors
from prismrec.models.backbones import BackboneOptions, build_recommender
from prismrec.models.base import ItemEncoder, Recommender
from prismrec.models.enhancers.adapters import unique_with_inverse
from prismrec.options import ModelConfig


class EnhancerConfig(ModelConfig):
    """Options every enhancer baseline shares (the backbone ones mirror ``DMESRConfig``)."""

    semantics: str = Field(..., description="semantics artefact name (under $PRISMREC_HOME/semantics) or path")
    backbone: Literal["sasrec", "bert4rec", "gru4rec"] = "sasrec"
    hidden_size: int = Field(128, ge=1, description="d, the item vectors' and the backbone's width")
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(1, ge=1)
    max_len: int = Field(200, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    mask_prob: float = Field(0.6, gt=0.0, le=1.0, description="cloze masking probability (bert4rec backbone)")
    id_embedding: bool = Field(False, description="add a learned ID embedding to the item vectors (as DMESR's "
                               "option of the same name); the baselines' papers replace IDs, so off by default")

    def backbone_options(self) -> BackboneOptions:
        return BackboneOptions(hidden_size=self.hidden_size, max_len=self.max_len, dropout=self.dropout,
                               num_blocks=self.num_blocks, num_heads=self.num_heads, mask_prob=self.mask_prob)


class UniqueItemEncoder(ItemEncoder):
    """An item encoder whose per-item computation runs once per distinct id of a call, then is gathered.

    Subclasses implement :meth:`vectors` for a 1-d tensor of distinct ids; padding (id 0) is zeroed here.
    """

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _masked(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.vectors(ids)
        return out * (ids != 0).unsqueeze(-1).to(out.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, (inverse,) = unique_with_inverse(ids)
        return self._masked(unique)[inverse]

    def all_items(self) -> torch.Tensor:
        return self._masked(torch.arange(self.n_items + 1, device=self.device_hint()))

    def device_hint(self) -> torch.device:
        buffer = next(self.buffers(), None)
        return buffer.device if buffer is not None else super().device_hint()


class EnhancedRecommender(Recommender):
    """An enhancer's item encoder + the configured backbone, plus the enhancer's auxiliary losses."""

    def __init__(self, config: EnhancerConfig, item_encoder: ItemEncoder) -> None:
        super().__init__()
        self.config = config
        self.max_len = config.max_len
        self.inner = build_recommender(config.backbone, item_encoder, config.backbone_options())

    @property
    def item_encoder(self) -> ItemEncoder:
        return self.inner.item_encoder

    @property
    def n_items(self) -> int:
        return self.item_encoder.n_items

    def extra_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Fields the auxiliary losses need besides the backbone's batch (none by default)."""
        return {}

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def training_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        batch = self.inner.training_batch(sequences, rng)
        batch.update(self.extra_batch(sequences, rng))
        return batch

    def training_loss(self, batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
        rec_loss = self.inner.training_loss(batch, loss)
        extra = self.auxiliary_loss(batch)
        return rec_loss if extra is None else rec_loss + extra

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        return self.inner.score(inputs, candidates)

    def score_factors(self, inputs: torch.Tensor) -> ScoreFactors | None:
        return self.inner.score_factors(inputs)

    # Dot-product form (score = user_vectors(inputs) @ output_items().T), as SequentialRecommender offers it.
    def user_vectors(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner.user_vectors(inputs)

    def output_items(self) -> torch.Tensor:
        return self.inner.output_items()


def consecutive_pairs(sequences: list[np.ndarray], window: int = 1, max_len: int | None = None) -> np.ndarray:
    """(P, 2) item pairs consumed within ``window`` steps of each other (``window=1``: consecutively), over
    each sequence's last ``max_len`` items (all when None); pairs of an item with itself are dropped."""
    chunks = []
    for seq in sequences:
        seq = np.asarray(seq[-max_len:] if max_len else seq, dtype=np.int64)
        for gap in range(1, window + 1):
            if len(seq) > gap:
                chunks.append(np.stack([seq[:-gap], seq[gap:]], axis=1))
    if not chunks:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(chunks)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def sample_pairs(pairs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` rows of ``pairs`` drawn at random, no two sharing a left item nor a right item (so
    that, in an in-batch contrastive loss, a row's positive is never also another row's negative)."""
    if len(pairs) == 0:
        return pairs
    order = rng.permutation(len(pairs))
    for column in (0, 1):
        _, first = np.unique(pairs[order, column], return_index=True)
        order = order[np.sort(first)]
    return pairs[order[:count]]
