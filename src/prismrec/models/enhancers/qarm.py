"""QARM baseline: quantitative alignment of multimodal representations (Luo et al., arXiv:2411.11739, Kuaishou;
DMESR paper section 4.1.2).

Pipeline, run once when the model is built (deterministic for the run seed):

1. **Item alignment.** The frozen MLLM item embeddings ``x_i`` are aligned to collaborative signals by
   contrastive fine-tuning against item pairs that co-occur in the *training* sequences: a projection head
   ``g`` (DMESR's :class:`~prismrec.models.enhancers.adapters.Adapter`, d0 -> d0/2 -> ``aligned_dim``) is trained with
   in-batch InfoNCE (:func:`symmetric_contrastive`) so that ``g(x_i)`` and ``g(x_j)`` of a co-occurring pair
   are close; ``a_i = g(x_i) / |g(x_i)|``.
2. **Vector quantisation (VQ).** k-means (scikit-learn) with ``vq_codebook_size`` centroids over all
   ``a_i``; each item's VQ code is the indices of its ``vq_top_k`` nearest centroids (nearest first).
3. **Residual quantisation (RQ).** ``rq_levels`` levels of k-means with ``rq_codebook_size`` centroids:
   level 1 clusters ``a_i``, level l clusters the residuals left by levels < l; the item's RQ code is its
   cluster at each level (RQ-k-means, a semantic ID of depth ``rq_levels``).
4. **Recommendation.** The backbone trains on item vectors built from the codes only:
   ``e_i = sum_k E_vq[vq_k(i)] + sum_l E_rq^l[rq_l(i)]``, with learned code embeddings (one table for the VQ
   codes, one per RQ level). Codes and codebooks are buffers (saved with the model, so inference needs no
   artefact); the MLLM embeddings themselves are not kept.

Choices the descriptions leave open (switchable in :class:`QARMConfig`):

* Input embedding: the concatenation of the ``text``, ``visual`` and ``hybrid`` route embeddings of the
  DMESR artefact (the same MLLM-derived semantics DMESR reads; QARM's own MLLM emits one multimodal
  embedding, which the three routes together stand in for). ``source_routes`` changes it.
* Alignment: QARM fine-tunes the MLLM itself on Swing item-to-item pairs; the MLLM is frozen here (its
  descriptions are cached), so a projection head on top of the frozen embeddings is what is fine-tuned,
  with pairs consumed within ``pair_window`` steps of each other (1 = consecutively) in the training
  sequences (validation and test items never enter). Head: GELU between the two affine maps; InfoNCE with
  the positive in the denominator, tau = ``align_temperature``; Adam, ``align_steps`` steps of
  ``align_batch`` pairs (at most one per distinct left and right item). ``align_steps = 0`` skips the
  alignment (codes of the L2-normalised raw embeddings).
* VQ codebook: k-means centroids (QARM picks codebook entries from item embeddings; the issue asks for a
  real k-means). Distances: Euclidean on the unit-normalised ``a_i`` (so ranking is by cosine).
* k-means: scikit-learn ``KMeans`` (k-means++ init, ``n_init=1``, ``kmeans_max_iter`` Lloyd iterations),
  ``random_state`` drawn from the global torch generator (seeded by the run seed), level l gets seed + l.
  A codebook is never larger than the number of distinct points it clusters (tiny datasets; deep RQ levels
  whose residuals are already zero).
* Code embeddings are summed (not averaged or concatenated); code id 0 is padding, codes are stored +1.
  Items with identical codes get identical vectors unless ``id_embedding = true`` (off by default: the
  paper trains on the code embeddings).
* Alignment and quantisation happen once, in :meth:`QARM.build`; the code embeddings and the backbone are
  then trained by the backbone's own objective (no auxiliary loss). Backbones: SASRec, BERT4Rec (cloze) and
  GRU4Rec through :func:`~prismrec.models.backbones.build_recommender`. ``from_state`` rebuilds the model
  from the saved codes without re-running alignment or k-means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.models.backbones.sasrec import xavier_init
from prismrec.models.enhancers.adapters import Activation, Adapter, load_semantic_matrices
from prismrec.models.enhancers.alignment import symmetric_contrastive
from prismrec.models.enhancers.base import (
    EnhancedRecommender,
    EnhancerConfig,
    UniqueItemEncoder,
    consecutive_pairs,
    sample_pairs,
)
from prismrec.models.registry import MODELS

SourceRoute = Literal["text", "visual", "hybrid", "original"]


class QARMConfig(EnhancerConfig):
    name: Literal["qarm"] = "qarm"
    source_routes: list[SourceRoute] = Field(default_factory=lambda: ["text", "visual", "hybrid"], min_length=1,
                                             description="artefact matrices concatenated into the MLLM embedding")
    aligned_dim: int = Field(64, ge=1, description="width of the aligned embeddings that are quantised")
    align_activation: Activation = "gelu"
    align_steps: int = Field(200, ge=0, description="contrastive alignment steps (0: quantise the raw embeddings)")
    align_batch: int = Field(512, ge=2)
    align_lr: float = Field(1e-3, gt=0.0)
    align_temperature: float = Field(0.1, gt=0.0)
    pair_window: int = Field(1, ge=1, description="items within this many steps count as co-occurring")
    vq_codebook_size: int = Field(256, ge=1)
    vq_top_k: int = Field(2, ge=1, description="VQ code depth: nearest centroids kept per item")
    rq_codebook_size: int = Field(256, ge=1)
    rq_levels: int = Field(3, ge=1, description="RQ code depth")
    kmeans_max_iter: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _top_k_fits(self) -> QARMConfig:
        if self.vq_top_k > self.vq_codebook_size:
            raise ValueError(f"vq_top_k ({self.vq_top_k}) exceeds vq_codebook_size ({self.vq_codebook_size})")
        return self


@dataclass
class QuantisedItems:
    """Per item (row 0 = padding, all codes 0): VQ and RQ codes (+1, so 0 is padding) and the codebooks."""

    vq_codes: np.ndarray  # (n_items + 1, vq_top_k) int64
    rq_codes: np.ndarray  # (n_items + 1, rq_levels) int64
    vq_codebook: np.ndarray  # (K_vq, aligned_dim) float32
    rq_codebooks: list[np.ndarray]  # rq_levels x (K_l, aligned_dim) float32


def align_embeddings(embeddings: np.ndarray, pairs: np.ndarray, config: QARMConfig,
                     rng: np.random.Generator) -> np.ndarray:
    """(n_items + 1, d0) frozen embeddings -> (n_items, aligned_dim) unit vectors of the items 1..n."""
    x = torch.from_numpy(embeddings)
    if config.align_steps == 0 or len(pairs) < 2:
        return F.normalize(x[1:], dim=-1).numpy()
    head = Adapter(x.shape[1], config.aligned_dim, config.align_activation)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.align_lr)
    for _ in range(config.align_steps):
        batch = torch.from_numpy(sample_pairs(pairs, config.align_batch, rng))
        loss = symmetric_contrastive(head(x[batch[:, 0]]), head(x[batch[:, 1]]), config.align_temperature, "infonce")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return F.normalize(head(x[1:]), dim=-1).numpy()


def _kmeans(points: np.ndarray, size: int, seed: int, max_iter: int):
    from sklearn.cluster import KMeans

    distinct = len(np.unique(points.round(6), axis=0))
    return KMeans(n_clusters=max(1, min(size, distinct)), n_init=1, max_iter=max_iter, random_state=seed).fit(points)


def quantise(aligned: np.ndarray, config: QARMConfig, seed: int) -> QuantisedItems:
    """VQ (top-k nearest centroids) and RQ (k-means on residuals) codes of the aligned item embeddings."""
    points = aligned.astype(np.float64)
    if len(points) < config.vq_top_k:
        raise ValueError(f"QARM: {len(points)} items cannot each get {config.vq_top_k} distinct VQ codes")
    vq = _kmeans(points, max(config.vq_codebook_size, config.vq_top_k), seed, config.kmeans_max_iter)
    if vq.n_clusters < config.vq_top_k:  # fewer distinct embeddings than the code depth: keep the depth
        vq = _kmeans(points + 1e-3 * np.random.default_rng(seed).normal(size=points.shape), config.vq_top_k, seed,
                     config.kmeans_max_iter)
    nearest = np.argsort(vq.transform(points), axis=1, kind="stable")[:, : config.vq_top_k]
    residual = points.copy()
    rq_codes, rq_books = [], []
    for level in range(config.rq_levels):
        km = _kmeans(residual, config.rq_codebook_size, seed + 1 + level, config.kmeans_max_iter)
        codes = km.predict(residual)
        residual = residual - km.cluster_centers_[codes]
        rq_codes.append(codes)
        rq_books.append(km.cluster_centers_.astype(np.float32))
    pad = np.zeros((1, 1), dtype=np.int64)
    return QuantisedItems(
        vq_codes=np.vstack([pad.repeat(config.vq_top_k, 1), nearest.astype(np.int64) + 1]),
        rq_codes=np.vstack([pad.repeat(config.rq_levels, 1), np.stack(rq_codes, axis=1).astype(np.int64) + 1]),
        vq_codebook=vq.cluster_centers_.astype(np.float32),
        rq_codebooks=rq_books,
    )


class QARMItemEncoder(UniqueItemEncoder):
    """``e_i = sum_k E_vq[vq_k(i)] + sum_l E_rq^l[rq_l(i)]`` (+ an optional ID embedding)."""

    def __init__(self, codes: QuantisedItems, dim: int, id_embedding: bool) -> None:
        super().__init__()
        self.dim = dim
        self.n_items = codes.vq_codes.shape[0] - 1
        self.register_buffer("vq_codes", torch.as_tensor(codes.vq_codes, dtype=torch.long))
        self.register_buffer("rq_codes", torch.as_tensor(codes.rq_codes, dtype=torch.long))
        self.register_buffer("vq_codebook", torch.as_tensor(codes.vq_codebook, dtype=torch.float32))
        for level, book in enumerate(codes.rq_codebooks):
            self.register_buffer(f"rq_codebook_{level}", torch.as_tensor(book, dtype=torch.float32))
        self.vq_embedding = nn.Embedding(len(codes.vq_codebook) + 1, dim, padding_idx=0)
        self.rq_embeddings = nn.ModuleList(nn.Embedding(len(book) + 1, dim, padding_idx=0)
                                           for book in codes.rq_codebooks)
        self.id_embedding = nn.Embedding(self.n_items + 1, dim, padding_idx=0) if id_embedding else None
        xavier_init(self)
        with torch.no_grad():
            for table in [self.vq_embedding, *self.rq_embeddings, *([self.id_embedding] if id_embedding else [])]:
                table.weight[0].zero_()

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.vq_embedding(self.vq_codes[ids]).sum(dim=-2)
        rq = self.rq_codes[ids]
        for level, table in enumerate(self.rq_embeddings):
            out = out + table(rq[..., level])
        return out + self.id_embedding(ids) if self.id_embedding is not None else out


@MODELS.register("qarm")
class QARM(EnhancedRecommender):
    Config = QARMConfig

    def __init__(self, config: QARMConfig, codes: QuantisedItems) -> None:
        if codes.vq_codes.shape[1] != config.vq_top_k or codes.rq_codes.shape[1] != config.rq_levels:
            raise ValueError(f"QARM codes of depth VQ {codes.vq_codes.shape[1]} / RQ {codes.rq_codes.shape[1]} do "
                             f"not match the config (vq_top_k {config.vq_top_k}, rq_levels {config.rq_levels})")
        super().__init__(config, QARMItemEncoder(codes, config.hidden_size, config.id_embedding))
        self.config: QARMConfig = config

    @property
    def encoder(self) -> QARMItemEncoder:
        return self.inner.item_encoder  # type: ignore[return-value]

    @classmethod
    def quantise_items(cls, config: QARMConfig, split: LeaveOneOutSplit) -> QuantisedItems:
        """Steps 1-3: align the artefact's embeddings to co-occurrence, then VQ and RQ codes."""
        seed = int(torch.randint(0, 2**31 - 1 - 64, (1,)))
        matrices = load_semantic_matrices(config.semantics, split.dataset, list(dict.fromkeys(config.source_routes)))
        embeddings = np.concatenate([matrices[r] for r in dict.fromkeys(config.source_routes)], axis=1)
        pairs = consecutive_pairs(split.train_sequences, window=config.pair_window)
        aligned = align_embeddings(embeddings, pairs, config, np.random.default_rng(seed))
        return quantise(aligned, config, seed)

    @classmethod
    def build(cls, config: QARMConfig, split: LeaveOneOutSplit) -> QARM:
        return cls(config, cls.quantise_items(config, split))

    @classmethod
    def from_state(cls, config: QARMConfig, n_items: int, state: dict[str, torch.Tensor]) -> QARM:
        prefix = "inner.item_encoder."
        books = [state[f"{prefix}rq_codebook_{level}"].numpy() for level in range(config.rq_levels)]
        codes = QuantisedItems(state[f"{prefix}vq_codes"].numpy(), state[f"{prefix}rq_codes"].numpy(),
                               state[f"{prefix}vq_codebook"].numpy(), books)
        model = cls(config, codes)
        model.load_state_dict(state)
        return model
