"""CPMM baseline: contrastive pre-training of multimodal item representations (Mo et al., Neurocomputing 2025,
"One multimodal plugin enhancing all"; DMESR paper section 4.1.2).

What the descriptions say, and how it is done here:

* **Item vector = sum of the projected textual and visual representations.** ``h^t = P_t(e^t)``,
  ``h^v = P_v(e^v)``, ``e_i = h^t_i + h^v_i``, replacing the ID embedding; ``P_t``, ``P_v`` are DMESR's
  :class:`~prismrec.models.enhancers.adapters.Adapter` (two affine maps, d0 -> d0/2 -> d).
* **Semantic purification by Gaussian noise** on the representations while training: ``h + sigma * rms(h)
  * N(0, I)`` on ``h^t`` and ``h^v`` separately (before the sum). Off at evaluation (``model.eval()``).
* **In-batch contrastive loss between the modalities** ``L_cl``: :func:`symmetric_contrastive` between
  ``h^t`` and ``h^v`` (the function DMESR's alignment uses; form and temperature below).
* **L2 "modality shift" loss** ``L_shift``: mean squared distance between the L2-normalised ``h^t`` and
  ``h^v`` of the same item (it closes the gap between the two modalities' clusters).
* **Co-occurrence loss** ``L_co``: items consumed consecutively in a training sequence are pulled together
  by an in-batch contrastive loss over pairs ``(e_i, e_j)``, the other pairs of the batch as negatives.
* **Then the backbone trains on it**: ``pretrain_steps`` steps of the CPMM losses alone at build time (a
  pre-training stage, as CPMM is a plug-in pre-training framework), then the backbone is trained on the
  item vectors with the CPMM losses kept as auxiliary terms: ``L = L_rec + w_cl L_cl + w_shift L_shift +
  w_co L_co``.

Choices the descriptions leave open (each switchable in :class:`CPMMConfig`):

* Inputs (for a fair comparison, the DMESR artefact): textual = the ``text`` route (the MLLM's textual
  description, embedded), visual = the ``visual`` route (the MLLM's image description, embedded). CPMM
  itself uses CLIP text/image features; ``text_route = "original"`` uses the embedded raw item text and
  ``visual_route = "image"`` the image encoder's own features (only artefacts from the ``describe`` backend
  have an ``image`` matrix).
* Noise scale: relative to each vector's root-mean-square (detached), ``noise_std`` = 0.1 by default, so the
  projection cannot defeat the noise by growing its output. Noise is added to the projected vectors (the
  "representations"), not to the frozen inputs.
* Contrastive form and temperature: InfoNCE (positive in the denominator) with tau = 0.2 on cosine
  similarities, CLIP-style; DMESR's tau = 2 makes the logits too flat for a loss that must separate items.
* The recommendation loss sees one noise draw, the auxiliary losses another (they are separate passes over
  the items); both are draws of the same noise process.
* Which items form the modality batch: the unique *target* items of the batch, capped at
  ``max_aux_items`` by a random subset (as DMESR). Pre-training: ``pretrain_batch`` random items per step.
* Co-occurrence pairs: consecutive items (window 1) of the batch users' training sequences (their last
  ``max_len + 1`` items); pre-training draws them from every training sequence. At most one pair per
  distinct left item and per distinct right item (fewer false negatives), ``max_cooccurrence_pairs`` per
  step; ``L_co`` compares the item vectors ``e`` of the two items as the backbone sees them (noised while
  training).
* Pre-training optimiser: Adam, ``pretrain_lr``, on the projections (and ID embedding) only; randomness
  comes from the global torch seed the trainer sets (deterministic for a run seed). Every CPMM loss is
  invariant to the scale of the item vectors (cosine similarities, normalised shift, relative noise), and
  Adam inflates that scale freely (about 10x in 100 steps on MovieLens), which would saturate the
  backbone's dot-product logits; so after pre-training the output maps are rescaled to give the item
  vectors their mean norm from before the stage (a change none of the CPMM losses can see).
* Loss weights ``w_cl = w_shift = w_co = 0.1`` (DMESR's default alpha); the descriptions give none.
* Backbones: SASRec, BERT4Rec (cloze objective, mask vector at masked positions) and GRU4Rec, through
  :func:`~prismrec.models.backbones.build_recommender` (see :mod:`prismrec.models.enhancers.base`); the auxiliary
  losses only read the batch's targets, so they apply unchanged to cloze batches.
* ``id_embedding`` (off): optionally add a learned ID embedding, as DMESR's option.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.models.backbones.sasrec import xavier_init
from prismrec.models.enhancers.adapters import Activation, Adapter, SemanticItemTables, load_semantic_matrices
from prismrec.models.enhancers.alignment import AlignmentForm, symmetric_contrastive
from prismrec.models.enhancers.base import (
    EnhancedRecommender,
    EnhancerConfig,
    UniqueItemEncoder,
    consecutive_pairs,
    sample_pairs,
)
from prismrec.models.registry import MODELS


class CPMMConfig(EnhancerConfig):
    name: Literal["cpmm"] = "cpmm"
    text_route: Literal["text", "original"] = Field("text", description="matrix used as the textual modality")
    visual_route: Literal["visual", "image"] = Field("visual", description="matrix used as the visual modality")
    adapter_activation: Activation = "none"
    noise_std: float = Field(0.1, ge=0.0, description="Gaussian noise std relative to each vector's RMS (training)")
    temperature: float = Field(0.2, gt=0.0, description="contrastive temperature on cosine similarities")
    alignment_form: AlignmentForm = "infonce"
    contrastive_weight: float = Field(0.1, ge=0.0, description="w_cl, text<->visual in-batch contrastive loss")
    shift_weight: float = Field(0.1, ge=0.0, description="w_shift, L2 modality shift loss")
    cooccurrence_weight: float = Field(0.1, ge=0.0, description="w_co, consecutive-item contrastive loss")
    max_aux_items: int = Field(1024, ge=2)
    max_cooccurrence_pairs: int = Field(512, ge=2)
    pretrain_steps: int = Field(100, ge=0, description="CPMM-loss-only steps at build time (0: none)")
    pretrain_batch: int = Field(512, ge=2)
    pretrain_lr: float = Field(1e-3, gt=0.0)


class CPMMItemEncoder(UniqueItemEncoder):
    """``e_i = noise(P_t(e^t_i)) + noise(P_v(e^v_i))`` (+ an optional ID embedding)."""

    def __init__(self, config: CPMMConfig, matrices: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.text_route, self.visual_route = config.text_route, config.visual_route
        self.tables = SemanticItemTables({r: matrices[r] for r in (self.text_route, self.visual_route)})
        self.n_items = self.tables.n_items
        self.dim = config.hidden_size
        self.noise_std = config.noise_std
        self.project_text = Adapter(self.tables.dim(self.text_route), self.dim, config.adapter_activation)
        self.project_visual = Adapter(self.tables.dim(self.visual_route), self.dim, config.adapter_activation)
        self.id_embedding = nn.Embedding(self.n_items + 1, self.dim, padding_idx=0) if config.id_embedding else None
        xavier_init(self)

    def _purify(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise_std == 0:
            return h
        scale = h.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
        return h + self.noise_std * scale * torch.randn_like(h)

    def modalities(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^t, h^v) for ``ids``, noised while training."""
        h_text = self.project_text(self.tables.table(self.text_route)[ids])
        h_visual = self.project_visual(self.tables.table(self.visual_route)[ids])
        return self._purify(h_text), self._purify(h_visual)

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        h_text, h_visual = self.modalities(ids)
        out = h_text + h_visual
        return out + self.id_embedding(ids) if self.id_embedding is not None else out


def cpmm_losses(encoder: CPMMItemEncoder, config: CPMMConfig, items: torch.Tensor,
                pairs: torch.Tensor) -> torch.Tensor:
    """``w_cl L_cl + w_shift L_shift`` over ``items`` (distinct ids) + ``w_co L_co`` over ``pairs`` (P, 2)."""
    total = torch.zeros((), device=items.device)
    if len(items) >= 2 and (config.contrastive_weight > 0 or config.shift_weight > 0):
        h_text, h_visual = encoder.modalities(items)
        if config.contrastive_weight > 0:
            total = total + config.contrastive_weight * symmetric_contrastive(
                h_text, h_visual, config.temperature, config.alignment_form)
        if config.shift_weight > 0:
            shift = (F.normalize(h_text, dim=-1) - F.normalize(h_visual, dim=-1)).pow(2).sum(-1).mean()
            total = total + config.shift_weight * shift
    if len(pairs) >= 2 and config.cooccurrence_weight > 0:
        left, right = encoder(pairs[:, 0]), encoder(pairs[:, 1])
        total = total + config.cooccurrence_weight * symmetric_contrastive(
            left, right, config.temperature, config.alignment_form)
    return total


@MODELS.register("cpmm")
class CPMM(EnhancedRecommender):
    Config = CPMMConfig

    def __init__(self, config: CPMMConfig, matrices: dict[str, np.ndarray]) -> None:
        super().__init__(config, CPMMItemEncoder(config, matrices))
        self.config: CPMMConfig = config

    @property
    def encoder(self) -> CPMMItemEncoder:
        return self.inner.item_encoder  # type: ignore[return-value]

    @classmethod
    def build(cls, config: CPMMConfig, split: LeaveOneOutSplit) -> CPMM:
        matrices = load_semantic_matrices(config.semantics, split.dataset,
                                          sorted({config.text_route, config.visual_route}))
        model = cls(config, matrices)
        model.pretrain(consecutive_pairs(split.train_sequences))
        return model

    @classmethod
    def from_state(cls, config: CPMMConfig, n_items: int, state: dict[str, torch.Tensor]) -> CPMM:
        prefix = "inner.item_encoder.tables.table_"
        matrices = {k.removeprefix(prefix): v.numpy() for k, v in state.items() if k.startswith(prefix)}
        model = cls(config, matrices)
        model.load_state_dict(state)
        return model

    def pretrain(self, pairs: np.ndarray) -> list[float]:
        """The CPMM pre-training stage: ``pretrain_steps`` Adam steps on the CPMM losses alone, then the item
        vectors are scaled back to their mean norm before the stage (see the module docstring)."""
        c = self.config
        if c.pretrain_steps == 0:
            return []
        encoder = self.encoder
        norm_before = self._mean_item_norm()
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
        optimizer = torch.optim.Adam(encoder.parameters(), lr=c.pretrain_lr)
        device = encoder.device_hint()
        losses = []
        encoder.train()
        for _ in range(c.pretrain_steps):
            items = rng.choice(np.arange(1, encoder.n_items + 1), size=min(c.pretrain_batch, encoder.n_items),
                               replace=False)
            batch_pairs = sample_pairs(pairs, c.pretrain_batch, rng)
            loss = cpmm_losses(encoder, c, torch.from_numpy(items).to(device), torch.from_numpy(batch_pairs).to(device))
            if not loss.requires_grad:
                break  # every weight is zero: nothing to pre-train
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self._rescale(norm_before / self._mean_item_norm())
        return losses

    @torch.no_grad()
    def _mean_item_norm(self) -> float:
        was_training = self.encoder.training
        self.encoder.eval()
        norm = float(self.encoder.all_items()[1:].norm(dim=-1).mean())
        self.encoder.train(was_training)
        return norm

    @torch.no_grad()
    def _rescale(self, factor: float) -> None:
        """Multiply every item vector by ``factor`` (the output maps and the ID embedding are linear in it)."""
        encoder = self.encoder
        for layer in (encoder.project_text.fc2, encoder.project_visual.fc2):
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)
        if encoder.id_embedding is not None:
            encoder.id_embedding.weight.mul_(factor)

    def extra_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        pairs = consecutive_pairs(sequences, max_len=self.max_len + 1)
        return {"cooccurrence_pairs": torch.from_numpy(sample_pairs(pairs, self.config.max_cooccurrence_pairs, rng))}

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        targets = batch["targets"]
        items = torch.unique(targets[targets > 0])
        if len(items) > self.config.max_aux_items:
            items = items[torch.randperm(len(items), device=items.device)[: self.config.max_aux_items]]
        return cpmm_losses(self.encoder, self.config, items, batch["cooccurrence_pairs"])
