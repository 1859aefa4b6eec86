"""DMESR: Dual-view MLLM-based Enhancing framework for multimodal Sequential Recommendation.

Implements paper ``002_ba3a20df7442af7f`` section 3 / Algorithm 1 on top of any prismrec backbone:

1. Frozen inputs per item (from a semantics artefact, ``prismrec derive``): e^t, e^i, e^h (the textual,
   visual and hybrid prompting routes, embedded) and e^T (the original item text, embedded), dim d0.
2. Adapter_1^{t,i,h} and Adapter_2 map them to d (Eq. 1, Eq. 4); in-batch contrastive alignment pulls
   the visual and hybrid adapted vectors towards the textual one (Eq. 2-3); e^coarse = adapted e^t,
   e^fine = Adapter_2(e^T).
3. Bidirectional cross-attention over the user's sequence fuses the two views (Eq. 5).
4. One shared backbone f_theta reads both fused sequences; score = [u^c : u^f] . [e^c_i : e^f_i] (Eq. 6);
   BCE with one paired negative per position (Eq. 7); total loss L_SRS + alpha L_align (Eq. 8).

Choices the paper leaves open (documented here, switchable in ``DMESRConfig``):

* Which items form the contrastive batch: the unique *target* items of the batch's positions (the items
  being predicted, each once), capped at ``max_align_items`` by a random subset. Using unique items
  avoids an item being its own negative; using targets keeps the alignment on items the recommender is
  learning about in this step.
* Eq. 2's denominator excludes the positive (``alignment_form="paper"``); ``"infonce"`` includes it.
* Item side of Eq. 6: the adapted (not cross-attended) e^coarse_i and e^fine_i, because cross-attention
  needs a sequence context and candidate items have none; this makes the item side user-independent, so
  it is computed once after training and cached for inference (paper 3.4).
* Cross-attention masks: see :class:`BidirectionalCrossAttention` (causal for causal backbones).
* ``cross_attention_residual``: Eq. 5 replaces each position's vector by a mixture of the other view's
  vectors, so the item at t is only present through attention; the option adds the view back (a residual
  connection, as Transformer blocks do). Off by default (paper form).
* ``id_embedding``: the paper replaces the ID embedding by the adapted semantics. With a strong baseline,
  frozen MiniLM vectors through a (linear) adapter lose to free ID embeddings, so we offer adding a learned
  ID embedding to both views' item vectors; the paper-faithful default is off.

Ablations (paper Table 3): ``without_alignment`` (w/o CL: e^coarse = a linear map of the concatenated
three adapted routes, no L_align), ``without_cross_attention`` (w/o CA), ``without_original_view``
(w/o Ori-view: the coarse view only), ``without_three_way`` (w/o TWP: the textual route only, no L_align).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from prismrec.data.split import LeaveOneOutSplit
from prismrec.evaluation.evaluators import ScoreFactors
from prismrec.models.backbones import BACKBONES
from prismrec.models.backbones.bert4rec import cloze_batch
from prismrec.models.backbones.sasrec import xavier_init
from prismrec.models.base import Recommender, next_item_batch
from prismrec.models.enhancers.adapters import (
    Activation,
    Adapter,
    SemanticItemTables,
    load_semantic_matrices,
    unique_with_inverse,
)
from prismrec.models.enhancers.alignment import AlignmentForm, symmetric_contrastive
from prismrec.models.enhancers.base import EnhancerConfig
from prismrec.models.enhancers.cross_attention import BidirectionalCrossAttention
from prismrec.models.losses import bce_one_negative, full_softmax_ce, sampled_softmax_ce
from prismrec.models.registry import MODELS

ROUTES = ("text", "visual", "hybrid", "original")


class DMESRConfig(EnhancerConfig):
    """The semantics artefact, backbone shape and ``id_embedding`` come from :class:`EnhancerConfig`,
    shared with the baselines so that every enhancer is configured the same way."""

    name: Literal["dmesr"] = "dmesr"
    adapter_activation: Activation = Field("none", description="paper: none (purely linear adapters)")
    alpha: float = Field(0.1, ge=0.0, description="weight of L_align (Eq. 8)")
    temperature: float = Field(2.0, gt=0.0, description="tau of Eq. 2 (paper: 2)")
    alignment_form: AlignmentForm = "paper"
    max_align_items: int = Field(1024, ge=2)
    cross_attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    cross_attention_residual: bool = Field(False, description="add each view back to its cross-attended "
                                           "output (not in the paper's Eq. 5)")
    without_alignment: bool = False
    without_cross_attention: bool = False
    without_original_view: bool = False
    without_three_way: bool = False


@MODELS.register("dmesr")
class DMESR(Recommender):
    Config = DMESRConfig

    def __init__(self, config: DMESRConfig, matrices: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.config = config
        self.max_len = config.max_len
        d = config.hidden_size
        routes = ["text"]
        if not config.without_three_way:
            routes += ["visual", "hybrid"]
        if not config.without_original_view:
            routes.append("original")
        self.tables = SemanticItemTables({r: matrices[r] for r in routes})
        self.n_items = self.tables.n_items

        def adapter(route: str) -> Adapter:
            return Adapter(self.tables.dim(route), d, config.adapter_activation)

        self.adapter_text = adapter("text")  # Adapter_1^t
        if not config.without_three_way:
            self.adapter_visual = adapter("visual")  # Adapter_1^i
            self.adapter_hybrid = adapter("hybrid")  # Adapter_1^h
            if config.without_alignment:
                self.route_fusion = nn.Linear(3 * d, d)  # w/o CL: concatenate the three routes instead
        spec = BACKBONES.get(config.backbone)
        self.objective = spec.objective  # "next_item" (SASRec, GRU4Rec) or "cloze" (BERT4Rec)
        if not config.without_original_view:
            self.adapter_original = adapter("original")  # Adapter_2
            if not config.without_cross_attention:
                self.cross_attention = BidirectionalCrossAttention(d, causal=self.objective == "next_item",
                                                                   dropout=config.cross_attention_dropout,
                                                                   residual=config.cross_attention_residual)
        self.id_embedding = nn.Embedding(self.n_items + 1, d, padding_idx=0) if config.id_embedding else None
        xavier_init(self)
        # f_theta, shared by both views; built after xavier_init so each backbone keeps its own initialisation.
        self.backbone = spec.build(config.backbone_options())
        self._item_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def build(cls, config: DMESRConfig, split: LeaveOneOutSplit) -> DMESR:
        return cls(config, load_semantic_matrices(config.semantics, split.dataset, ROUTES))

    @classmethod
    def from_state(cls, config: DMESRConfig, n_items: int, state: dict[str, torch.Tensor]) -> DMESR:
        matrices = {k.removeprefix("tables.table_"): v.numpy() for k, v in state.items()
                    if k.startswith("tables.table_")}
        for route in ROUTES:  # routes an ablation does not use were not saved; any placeholder will do
            matrices.setdefault(route, np.zeros((n_items + 1, 1), dtype=np.float32))
        model = cls(config, matrices)
        model.load_state_dict(state)
        return model

    # -- item side -------------------------------------------------------------------------------------
    @property
    def uses_alignment(self) -> bool:
        c = self.config
        return not (c.without_three_way or c.without_alignment) and c.alpha > 0

    def _routes(self, ids: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Adapted route vectors for ``ids`` (any shape): Eq. (1) per route, Eq. (4) for the original text."""
        adapters = {"text": "adapter_text", "visual": "adapter_visual", "hybrid": "adapter_hybrid",
                    "original": "adapter_original"}
        return {name: getattr(self, adapters[name])(self.tables.table(name)[ids]) for name in names}

    @property
    def _view_routes(self) -> tuple[str, ...]:
        """Routes the item vectors are built from. The visual and hybrid routes only reach e^coarse through
        the alignment loss (section 3.2.3), except in the w/o-CL ablation, which concatenates them."""
        names: tuple[str, ...] = ("text",)
        if self.config.without_alignment and not self.config.without_three_way:
            names += ("visual", "hybrid")
        if not self.config.without_original_view:
            names += ("original",)
        return names

    def _views(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(e^coarse, e^fine or None, adapted routes) for ``ids``; padding (id 0) maps to zero vectors."""
        routes = self._routes(ids, self._view_routes)
        if self.config.without_alignment and not self.config.without_three_way:
            coarse = self.route_fusion(torch.cat([routes["text"], routes["visual"], routes["hybrid"]], dim=-1))
        else:
            coarse = routes["text"]  # e^coarse = adapted textual embedding (section 3.2.3)
        fine = routes.get("original")
        if self.id_embedding is not None:
            ids_vec = self.id_embedding(ids)
            coarse = coarse + ids_vec
            fine = fine + ids_vec if fine is not None else None
        keep = (ids != 0).unsqueeze(-1).to(coarse.dtype)
        return coarse * keep, (fine * keep if fine is not None else None), routes

    def item_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n_items + 1, d) coarse and fine item tables; cached while the model is in eval mode."""
        if not self.training and self._item_cache is not None:
            return self._item_cache
        ids = torch.arange(self.n_items + 1, device=self.tables.table("text").device)
        coarse, fine, _ = self._views(ids)
        if not self.training:
            self._item_cache = (coarse, fine)
        return coarse, fine

    def train(self, mode: bool = True) -> DMESR:
        self._item_cache = None  # parameters may change: recompute the item side after training
        return super().train(mode)

    # -- sequence side ---------------------------------------------------------------------------------
    def _user_states(self, inputs: torch.Tensor, coarse_seq: torch.Tensor,
                     fine_seq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        padding = inputs == 0
        if fine_seq is not None and not self.config.without_cross_attention:
            coarse_seq, fine_seq = self.cross_attention(coarse_seq, fine_seq, padding)  # Eq. (5)
        if fine_seq is None:
            return self.backbone(coarse_seq, padding), None
        # u^coarse = f_theta(S^coarse), u^fine = f_theta(S^fine): one shared backbone, run once on both views
        # stacked along the batch (same result as two calls, better use of the cores).
        hidden = self.backbone(torch.cat([coarse_seq, fine_seq]), torch.cat([padding, padding]))
        hidden_coarse, hidden_fine = hidden.split(inputs.shape[0])
        return hidden_coarse, hidden_fine

    @property
    def mask_id(self) -> int:
        return self.n_items + 1

    def _with_mask_token(self, inputs: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor | None:
        """Cloze objective: masked positions (id ``n_items + 1``) carry the backbone's learned mask vector
        in both views, before cross-attention (the mask id never reaches the adapters)."""
        if view is None or self.objective != "cloze":
            return view
        is_mask = (inputs == self.mask_id).unsqueeze(-1)
        return torch.where(is_mask, self.backbone.mask_token.to(view.dtype), view)

    def _batch_views(self, *id_tensors: torch.Tensor, naive: bool = False):
        """Views for several id tensors, adapting each distinct item once (``naive``: once per token)."""
        id_tensors = tuple(t.masked_fill(t == self.mask_id, 0) for t in id_tensors)
        if naive:
            return [self._views(t)[:2] for t in id_tensors]
        unique, inverses = unique_with_inverse(*id_tensors)
        coarse, fine, _ = self._views(unique)
        return [(coarse[inv], fine[inv] if fine is not None else None) for inv in inverses]

    def _user_vectors(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u^coarse, u^fine or None) at the last position (an appended mask position for BERT4Rec)."""
        coarse_all, fine_all = self.item_tables()
        if self.objective == "cloze":  # score at an appended mask position (BERT4Rec)
            appended = torch.full((inputs.shape[0], 1), self.mask_id, dtype=inputs.dtype, device=inputs.device)
            inputs = torch.cat([inputs, appended], dim=1)
        ids = inputs.masked_fill(inputs == self.mask_id, 0)
        coarse_seq = self._with_mask_token(inputs, coarse_all[ids])
        fine_seq = self._with_mask_token(inputs, fine_all[ids]) if fine_all is not None else None
        hidden_c, hidden_f = self._user_states(inputs, coarse_seq, fine_seq)
        return hidden_c[:, -1], (hidden_f[:, -1] if hidden_f is not None else None)

    def score_factors(self, inputs: torch.Tensor) -> ScoreFactors:
        """Eq. (6) as u^c . e^c + u^f . e^f, the order ``score`` sums them in."""
        coarse_all, fine_all = self.item_tables()
        user_c, user_f = self._user_vectors(inputs)
        if user_f is None or fine_all is None:
            return ScoreFactors((user_c,), (coarse_all,))
        return ScoreFactors((user_c, user_f), (coarse_all, fine_all))

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        coarse_all, fine_all = self.item_tables()
        user_c, user_f = self._user_vectors(inputs)
        if candidates is None:  # Eq. (6) against every item
            scores = user_c @ coarse_all.T
            return scores + user_f @ fine_all.T if user_f is not None else scores
        scores = torch.einsum("bd,bcd->bc", user_c, coarse_all[candidates])
        if user_f is not None:
            scores = scores + torch.einsum("bd,bcd->bc", user_f, fine_all[candidates])
        return scores

    # -- training --------------------------------------------------------------------------------------
    def training_batch(self, sequences: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if self.objective == "cloze":
            return cloze_batch(sequences, self.max_len, self.n_items, self.config.mask_prob, rng)
        return next_item_batch(sequences, self.max_len, self.n_items, rng)

    def alignment_loss(self, targets: torch.Tensor) -> torch.Tensor:
        """L_align = L^(t<->i) + L^(t<->h) (Eq. 3) over the batch's unique target items (at most
        ``max_align_items``, a random subset beyond that)."""
        items = torch.unique(targets[(targets > 0) & (targets <= self.n_items)])
        if len(items) > self.config.max_align_items:
            items = items[torch.randperm(len(items), device=items.device)[: self.config.max_align_items]]
        routes = self._routes(items, ("text", "visual", "hybrid"))
        text, visual, hybrid = routes["text"], routes["visual"], routes["hybrid"]
        tau, form = self.config.temperature, self.config.alignment_form
        return symmetric_contrastive(text, visual, tau, form) + symmetric_contrastive(text, hybrid, tau, form)

    def training_loss(self, batch: dict[str, torch.Tensor], loss: str, naive: bool = False) -> torch.Tensor:
        inputs, targets, negatives = batch["inputs"], batch["targets"], batch["negatives"]
        mask = targets > 0
        sampled = loss == "sampled_ce"
        extra = (batch["sampled_ids"],) if sampled else ()
        views = self._batch_views(inputs, targets, negatives, *extra, naive=naive)
        (in_c, in_f), (pos_c, pos_f), (neg_c, neg_f) = views[:3]
        hidden_c, hidden_f = self._user_states(inputs, self._with_mask_token(inputs, in_c),
                                               self._with_mask_token(inputs, in_f))
        if sampled:  # the targets' and the draws' views only (each distinct item adapted once)
            draw_c, draw_f = views[3]
            hidden = hidden_c if hidden_f is None else torch.cat([hidden_c, hidden_f], dim=-1)
            pos = pos_c if pos_f is None else torch.cat([pos_c, pos_f], dim=-1)
            draws = draw_c if draw_f is None else torch.cat([draw_c, draw_f], dim=-1)
            rec_loss = sampled_softmax_ce(hidden, pos, draws, targets, batch["sampled_ids"],
                                          batch["sampled_logq"], mask)
        elif loss == "ce":
            coarse_all, fine_all = self.item_tables()
            hidden = hidden_c if hidden_f is None else torch.cat([hidden_c, hidden_f], dim=-1)
            table = coarse_all if fine_all is None else torch.cat([coarse_all, fine_all], dim=-1)
            rec_loss = full_softmax_ce(hidden, table, targets, mask)
        else:  # Eq. (7) with the concatenated views of Eq. (6)
            hidden = hidden_c if hidden_f is None else torch.cat([hidden_c, hidden_f], dim=-1)
            pos = pos_c if pos_f is None else torch.cat([pos_c, pos_f], dim=-1)
            neg = neg_c if neg_f is None else torch.cat([neg_c, neg_f], dim=-1)
            rec_loss = bce_one_negative(hidden, pos, neg, mask)
        if not self.uses_alignment:
            return rec_loss
        return rec_loss + self.config.alpha * self.alignment_loss(targets)  # Eq. (8)
