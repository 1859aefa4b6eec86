"""The Speeder model: an LLM + MRC + SPAE, scored by retrieval (ranking) and by the LM head (choice).

:class:`Speeder` embeds a :class:`~prismrec.llmrec.speeder.prompts.PromptBatch` (the prompt's text tokens plus
MRC's soft item tokens, with SPAE's absolute position embeddings on the history items), runs the LLM's decoder,
scores candidates from the hidden state at the retrieval position and letters from the LM head at the choice
position, and switches its trainable parameters per MPO stage (:meth:`Speeder.set_stage`). It implements the
evaluators' ``Scorer`` protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prismrec.llmrec.speeder.compression import MixtureOfModalityExperts
from prismrec.llmrec.speeder.config import SpeederError, SpeederOptions, StageOptions
from prismrec.llmrec.speeder.prompts import PromptBatch, PromptBuilder


def _base_causal_lm(llm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class Speeder(nn.Module):
    """LLM + MRC + SPAE; implements the evaluators' ``Scorer`` protocol (``max_len``, ``score``)."""

    def __init__(self, llm: nn.Module, tokenizer: Any, features: dict[str, np.ndarray],
                 options: SpeederOptions) -> None:
        super().__init__()
        self.options = options
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_len = options.max_len
        base = _base_causal_lm(llm)
        embedding = base.get_input_embeddings()
        self.llm_dim = int(embedding.weight.shape[1])
        token_norm = float(embedding.weight.detach().float().norm(dim=-1).median())
        learned = options.collaborative_dim if options.collaborative == "learned" else None
        self.mrc = MixtureOfModalityExperts(features, self.llm_dim, options.n_item_tokens, options.expert_hidden,
                                            options.expert_dropout, token_norm, learned)
        self.n_items = self.mrc.n_items
        self.positions = nn.Embedding(options.max_len, self.llm_dim) if options.absolute_position_embeddings else None
        if self.positions is not None:
            nn.init.zeros_(self.positions.weight)
        self.score_head = nn.Linear(self.llm_dim, self.llm_dim)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.prompts = PromptBuilder(tokenizer, options)
        self._item_cache: torch.Tensor | None = None
        for param in self.llm.parameters():
            param.requires_grad_(False)
        self.to(embedding.weight.device)  # Speeder's own modules live with the LLM (float32 whatever its dtype)

    # parameters by role (what the MPO stages switch on and off)
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.llm.named_parameters() if "lora_" in n]

    def stage_parameters(self, stage: StageOptions) -> list[nn.Parameter]:
        params = [*self.mrc.gate.parameters(), *self.mrc.gate_norms.parameters(), self.mrc.token_scale,
                  *self.score_head.parameters(), self.logit_scale]
        if self.positions is not None:
            params += list(self.positions.parameters())
        for modality in stage.modalities:
            params += list(self.mrc.experts[modality].parameters())
            if modality == "collaborative" and self.mrc.learned_collaborative:
                params += list(self.mrc.id_table.parameters())
        if stage.lora:
            params += self.lora_parameters()
        return params

    def set_stage(self, stage: StageOptions) -> list[nn.Parameter]:
        """Activate ``stage``'s modalities and make exactly its parameters trainable; returns them."""
        self.mrc.set_active(stage.modalities)
        if stage.lora and not self.lora_parameters():
            raise SpeederError(f"stage {stage.name!r} trains LoRA but the LLM has no LoRA adapters attached")
        for param in self.parameters():
            param.requires_grad_(False)
        trainable = self.stage_parameters(stage)
        for param in trainable:
            param.requires_grad_(True)
        self._item_cache = None
        return trainable

    def train(self, mode: bool = True) -> Speeder:
        self._item_cache = None  # item tokens change while training
        return super().train(mode)

    # item side
    def item_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mrc(ids)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Output-side item vectors (the mean of the item's soft tokens, tied with the prompt)."""
        return self.item_tokens(ids).mean(dim=1)

    def all_item_vectors(self) -> torch.Tensor:
        if self._item_cache is None or self.training:
            ids = torch.arange(self.n_items + 1, device=self.logit_scale.device)
            table = torch.cat([self.item_vectors(chunk) for chunk in ids.split(4096)])
            if self.training:
                return table
            self._item_cache = table
        return self._item_cache

    # prompt side
    def embed(self, batch: PromptBatch) -> torch.Tensor:
        base = _base_causal_lm(self.llm)
        device = self.logit_scale.device
        embeds = base.get_input_embeddings()(batch.input_ids.to(device))
        slots = batch.slot_item.to(device) > 0
        if slots.any():
            item_ids = batch.slot_item.to(device)[slots]
            unique, inverse = torch.unique(item_ids, return_inverse=True)
            tokens = self.item_tokens(unique)[inverse, batch.slot_sub.to(device)[slots]]
            if self.positions is not None:
                pos = batch.slot_position.to(device)[slots]
                has_pos = pos >= 0
                tokens = tokens + self.positions(pos.clamp(min=0)) * has_pos[:, None].to(tokens.dtype)
            embeds = embeds.masked_scatter(slots[..., None], tokens.to(embeds.dtype))
        return embeds

    def hidden_states(self, batch: PromptBatch) -> torch.Tensor:
        base = _base_causal_lm(self.llm)
        decoder = base.get_decoder()
        out = decoder(inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask.to(self.logit_scale.device))
        return out.last_hidden_state

    def user_vectors(self, hidden: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # float32 head over a possibly bfloat16 LLM (CUDA default in llmrec.causal_lm)
        return self.score_head(hidden[rows, batch.retrieval_index.to(hidden.device)].float())

    def retrieval_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users (B, H), items (B, C, H) or (N, H) -> (B, C) or (B, N) scaled cosine scores."""
        u = F.normalize(users, dim=-1)
        v = F.normalize(items, dim=-1)
        scores = torch.einsum("bh,bch->bc", u, v) if v.dim() == 3 else u @ v.T
        return self.logit_scale * scores

    def choice_logits(self, hidden: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
        """(B, vocab) next-token logits at the choice position (the LM head runs there only)."""
        assert batch.choice_index is not None
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        head = _base_causal_lm(self.llm).get_output_embeddings()
        return head(hidden[rows, batch.choice_index.to(hidden.device)]).float()

    # Scorer protocol
    @torch.no_grad()
    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        histories = [row[row > 0].cpu().numpy() for row in inputs]
        batch = self.prompts.build(histories)
        users = self.user_vectors(self.hidden_states(batch), batch)
        if candidates is None:
            scores = self.retrieval_scores(users, self.all_item_vectors())
            scores[:, 0] = float("-inf")
            return scores
        unique, inverse = torch.unique(candidates, return_inverse=True)
        vectors = self.item_vectors(unique.to(users.device))[inverse.to(users.device)]
        return self.retrieval_scores(users, vectors)

    # training
    def loss(self, batch: PromptBatch, targets: torch.Tensor, negatives: torch.Tensor) -> dict[str, torch.Tensor]:
        """Retrieval sampled softmax (+ the weighted choice cross-entropy when the prompt lists candidates)."""
        device = self.logit_scale.device
        hidden = self.hidden_states(batch)
        users = self.user_vectors(hidden, batch)
        targets, negatives = targets.to(device), negatives.to(device)
        ids = torch.cat([targets, negatives])
        unique, inverse = torch.unique(ids, return_inverse=True)
        vectors = self.item_vectors(unique)[inverse]
        positive = self.retrieval_scores(users, vectors[:len(targets), None, :])  # (B, 1)
        negative = self.retrieval_scores(users, vectors[len(targets):])  # (B, K)
        negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        retrieval = F.cross_entropy(torch.cat([positive, negative], dim=1),
                                    torch.zeros(len(targets), dtype=torch.long, device=device))
        out = {"retrieval": retrieval, "loss": retrieval}
        if batch.choice_index is not None and batch.choice_target is not None and self.options.choice_loss_weight > 0:
            letters = torch.tensor(self.prompts.letter_ids, device=device)[batch.choice_target.to(device)]
            choice = F.cross_entropy(self.choice_logits(hidden, batch), letters)
            out["choice"] = choice
            out["loss"] = retrieval + self.options.choice_loss_weight * choice
        return out

    # weights (Speeder's own modules; the LLM's LoRA adapters are saved by llmrec.causal_lm)
    def own_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("llm.")}
