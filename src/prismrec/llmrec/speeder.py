"""Speeder: compressed multimodal item tokens for an LLM sequential recommender (seed ``001_7ca126ee1b30b0fc``).

The LLM *is* the recommender, as in MLLM-MSR (:mod:`prismrec.llmrec.mllm_msr`), but every item in the
prompt is a handful of soft tokens (default one) instead of its long textual description, so a prompt
with a 20-item history and 20 candidates is ~200 tokens and one LLM pass scores any number of candidates.

The seed paper is an abstract; its three components are built as below, and every detail it leaves open
is a choice recorded here (all switchable in :class:`SpeederOptions` / :class:`SpeederTrainingOptions`).

**Multimodal Representation Compression (MRC)** (:class:`MixtureOfModalityExperts`)

* Inputs per item (frozen): the *text* embedding (default: the semantics artefact's ``text`` matrix, the
  MiniLM embedding of the derived textual description, i.e. the very description MRC replaces in the
  prompt), the *image* embedding (default: the artefact's ``image`` matrix, EfficientNet-Lite0 poster
  features; ``visual`` can be named instead) and the *collaborative* embedding.
* Collaborative embedding: by default the item table of a SASRec model trained on the *training* split
  (``collaborative = "sasrec"``: frozen, loaded from a run directory with
  :func:`collaborative_table_from_sasrec_run`, or trained on the spot with :func:`train_sasrec_table`);
  a cheap pre-trained table carries real co-interaction signal, which a table learned from scratch inside
  an LLM during a few hundred CPU steps does not. ``collaborative = "learned"`` instead learns an ID table
  (``collaborative_dim`` wide) inside Speeder, trained only from the collaborative stage on.
* One expert per modality: LayerNorm -> Linear(d_m, expert_hidden) -> GELU -> Dropout ->
  Linear(expert_hidden, n_item_tokens * H), H = the LLM's input-embedding width.
* Gate: one linear layer over the concatenated LayerNorm'd inputs of all modalities (inactive modalities
  zeroed) -> softmax over the *active* modalities only (inactive logits masked to -inf), one weight vector
  per item, shared by its tokens. Item tokens = sum_m g_m * E_m(x_m).
* Scale: each output token is L2-normalised and multiplied by a learned scalar initialised to the median
  row norm of the LLM's input-embedding table, so soft tokens start on the scale of real word embeddings
  (a random MLP's output would otherwise be orders of magnitude off and swamp or vanish in the prompt).

**Modality-aware Progressive Optimisation (MPO)** (:func:`train_speeder`)

* Stages (default three): ``text`` (text expert only), ``text+visual`` (adds the visual expert),
  ``full`` (adds the collaborative expert and unfreezes the LoRA adapters). Each stage continues from the
  previous one's weights; experts added earlier *stay trainable* (the gate and earlier experts adapt to
  the newcomer). The LLM's own weights are always frozen; the LoRA adapters (peft, via
  :mod:`prismrec.llmrec.causal_lm`) are attached at construction (their B matrices are zero, so they
  are a no-op) and only receive gradients in a stage with ``lora = true``.
* Each stage runs ``steps`` optimiser steps with a fresh AdamW over exactly the parameters that stage
  trains (the parameter set changes between stages, so moment estimates would not carry over anyway);
  after each stage the validation metrics (sampled H@10 / N@10 and the 20-candidate Hit@1) are recorded.

**Sequential Position Awareness Enhancement (SPAE)**

* Relative cues (``relative_position_cues``): each history item is preceded by "most recent:" or
  "k interactions ago:" (k = 1 for the item before the most recent one); off: by "item:". No trailing
  space after a cue or a candidate letter (a lone space costs a token in byte-level BPEs).
* Absolute position embeddings (``absolute_position_embeddings``): a learned ``nn.Embedding(max_len, H)``
  added to the history items' soft tokens. Positions are aligned to the end of the history, like SASRec's
  left-padded positions (the most recent item always has index ``max_len - 1``), so a position means the
  same recency for every user whatever the history length. Initialised at zero, so switching the option on
  never perturbs the untrained prompt. Candidate items get no position embedding.

**Prompt** (no chat template: the model is fine-tuned on this layout; items are soft tokens ``<i>``)::

    A user interacted with these items, oldest first:
    19 interactions ago:<i>
    ...
    most recent:<i>
    The next item is:                  <- retrieval position (hidden state h)
    Candidates:
    A<i>B<i>...T<i>
    Answer: (                          <- choice position (LM head)

**Task and scoring**

* Ranking (sampled-100 / full, our evaluators): score(u, i) = s * cos(W h_u, t_i), h_u = the LLM's final
  hidden state at the retrieval position, t_i = the mean of item i's soft tokens, W a learned H x H map,
  s a learned logit scale (init 10). The prompt stops at the retrieval position for ranking, so one LLM
  pass per *user* scores all its candidates: the cheapest faithful option (a yes/no logit per candidate
  would need one pass per candidate, which is MLLM-MSR's cost we are measuring against). Item tokens are
  tied between the prompt and the output side, as SASRec ties its input and output item embeddings.
* Choice (Hit@1 over 20 candidates, the Speeder authors' validity-aware metric): the candidates are listed
  in the prompt with letters A.. in a per-user seeded shuffled order; the model's answer is the arg-max
  token over the *whole* vocabulary at the choice position (greedy first token). An answer that is not one
  of the listed candidates' letters is invalid and counts as a miss (:func:`validity_aware_hit_at_1`).
* Training loss (one LLM pass per example): sampled softmax of the positive against ``train_negatives``
  uniform items shared by the batch (the retrieval head), plus, in a ``choice_fraction`` share of the
  batches (default half; drawn per batch so a batch's prompts have similar lengths), ``choice_loss_weight``
  * cross-entropy over the full vocabulary for the correct letter at the choice position (the LM head only
  runs at that one position, never over the whole sequence). The candidate list is ~2 tokens per candidate
  (a letter and the soft token), 40+ tokens for 20, about as long as the 10-item history with its cues, so
  listing it in every training prompt would nearly double the training cost for the one metric that needs
  it; the retrieval loss, which every metric but Hit@1 uses, runs every step.
* Training examples: a random training user (users with >= 2 training items), a random cut point t >= 1
  of their training sequence, history = the ``max_len`` items before t, target = item t; the 19 choice
  negatives are uniform items the user never interacted with in training.

**Runs** (:func:`fit_run`, ``prismrec speeder train``): Speeder is not in the ``MODELS`` registry, because
the generic :class:`~prismrec.training.Trainer` trains one parameter set with one optimiser while MPO
switches parameter sets between stages and the LLM is loaded through :mod:`~prismrec.llmrec.causal_lm`; it
implements the evaluators' ``Scorer`` protocol (``max_len``, ``score``) so it is scored by the same evaluators
and cached negatives as every other model. The LLM's weights are not copied into the run: ``speeder.safetensors``
holds Speeder's own modules and ``lora/`` the adapter (no pickle anywhere).

**Not done**: images are never given to the LLM as pixels (the image *embedding* is an MRC input; that
is the paper's point); multi-token generation is not needed because answers are single letters.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from prismrec.data.dataset import SequenceDataset
from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import SampledRankingEvaluator

Modality = Literal["text", "visual", "collaborative"]
MODALITIES: tuple[Modality, ...] = ("text", "visual", "collaborative")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class SpeederError(ValueError):
    """A Speeder input or option problem, phrased for the person who gave it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpeederOptions(_Strict):
    """The model: MRC inputs and shape, SPAE switches, prompt and loss settings."""

    semantics: str = Field("movielens-small-describe", description="semantics artefact name or folder")
    text_matrix: str = Field("text", description="artefact matrix used as the text embedding")
    image_matrix: str = Field("image", description="artefact matrix used as the image embedding "
                              "(image: EfficientNet features; visual: embedded poster description)")
    collaborative: Literal["sasrec", "learned"] = Field("sasrec", description="sasrec: frozen item table of a "
                                                        "SASRec trained on the training split; learned: an ID "
                                                        "table learned inside Speeder")
    sasrec_run: Path | None = Field(None, description="SASRec run directory (collaborative = sasrec); "
                                    "None: the CLI trains one first")
    collaborative_dim: int = Field(64, ge=1, description="width of the learned ID table (collaborative = learned)")
    n_item_tokens: int = Field(1, ge=1, le=16, description="soft tokens per item")
    expert_hidden: int = Field(256, ge=1)
    expert_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_len: int = Field(20, ge=1, le=200, description="history items shown in the prompt (the most recent)")
    relative_position_cues: bool = Field(True, description="SPAE: 'most recent:' / 'k interactions ago:' cues")
    absolute_position_embeddings: bool = Field(True, description="SPAE: learned position embeddings on items")
    n_choices: int = Field(20, ge=2, le=26, description="candidates listed in the choice prompt (letters A..)")
    train_negatives: int = Field(64, ge=1, description="shared uniform negatives of the retrieval loss")
    choice_loss_weight: float = Field(1.0, ge=0.0, description="weight of the letter cross-entropy")
    choice_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of training batches whose prompts "
                                   "list the candidates (the others stop at the retrieval position)")


class LLMSpec(_Strict):
    """Which causal LM carries Speeder (loaded by :func:`prismrec.llmrec.causal_lm.load_causal_lm`)."""

    model: str = Field("smollm2-135m-instruct", description="the packaged SmolLM2 GGUF, a local HF folder or "
                       "a .gguf file")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class StageOptions(_Strict):
    """One MPO stage: the modalities it uses, whether LoRA trains, and its length."""

    name: str
    modalities: list[Modality]
    lora: bool = False
    steps: int = Field(50, ge=0)
    lr: float = Field(1e-3, gt=0)

    @field_validator("modalities")
    @classmethod
    def _text_first(cls, modalities: list[Modality]) -> list[Modality]:
        if not modalities:
            raise ValueError("a stage needs at least one modality")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modality listed twice: {modalities}")
        return modalities


def default_stages() -> list[StageOptions]:
    return [StageOptions(name="text", modalities=["text"], steps=60, lr=1e-3),
            StageOptions(name="text+visual", modalities=["text", "visual"], steps=60, lr=1e-3),
            StageOptions(name="full", modalities=["text", "visual", "collaborative"], lora=True, steps=120,
                         lr=5e-4)]


class SpeederTrainingOptions(_Strict):
    stages: list[StageOptions] = Field(default_factory=default_stages)
    batch_size: int = Field(8, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    valid_users: int = Field(64, ge=1, description="validation users scored after each stage")
    num_threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _stages_grow(self) -> SpeederTrainingOptions:
        if not self.stages:
            raise ValueError("at least one stage is needed")
        return self


class SpeederEvaluationOptions(_Strict):
    num_negatives: int = Field(100, ge=1)
    negative_seed: int = 42
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    batch_size: int = Field(16, ge=1)
    users: int | None = Field(None, ge=1, description="evaluate on the first N evaluation users (None: all)")


class SpeederDataOptions(_Strict):
    dataset: str = "movielens-small"
    data_dir: Path | None = None


class SpeederRunConfig(_Strict):
    """``configs/movielens_speeder.toml``: everything ``prismrec speeder train`` needs."""

    name: str = "speeder"
    seed: int = 42
    data: SpeederDataOptions = Field(default_factory=SpeederDataOptions)
    llm: LLMSpec = Field(default_factory=LLMSpec)
    model: SpeederOptions = Field(default_factory=SpeederOptions)
    training: SpeederTrainingOptions = Field(default_factory=SpeederTrainingOptions)
    evaluation: SpeederEvaluationOptions = Field(default_factory=SpeederEvaluationOptions)


# -- MRC ---------------------------------------------------------------------------------------------------

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


# -- prompts -----------------------------------------------------------------------------------------------

@dataclass
class PromptBatch:
    """Right-padded prompts: text token ids with item slots, and where to read the answers."""

    input_ids: torch.Tensor  # (B, T) token ids; slot positions hold the pad id (replaced by soft tokens)
    attention_mask: torch.Tensor  # (B, T)
    slot_item: torch.Tensor  # (B, T) item id at a soft-token slot, 0 elsewhere
    slot_sub: torch.Tensor  # (B, T) which of the item's n_tokens the slot holds
    slot_position: torch.Tensor  # (B, T) absolute position index of a history slot, -1 elsewhere
    retrieval_index: torch.Tensor  # (B,) position whose hidden state scores candidates
    choice_index: torch.Tensor | None  # (B,) position whose next-token logits name a candidate
    choice_target: torch.Tensor | None  # (B,) index (0..n_choices-1) of the positive in the listed candidates

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class PromptBuilder:
    """Builds token-id prompts with soft-token slots; text pieces are tokenised once and cached."""

    HEADER = "A user interacted with these items, oldest first:\n"
    RETRIEVAL = "The next item is:"
    CANDIDATES = "\nCandidates:\n"
    ANSWER = "Answer: ("

    def __init__(self, tokenizer: Any, options: SpeederOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self._cache: dict[str, list[int]] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.letter_ids = [self._letter_id(letter) for letter in LETTERS[:options.n_choices]]
        if len(set(self.letter_ids)) != len(self.letter_ids):
            raise SpeederError("the tokenizer maps two candidate letters to the same token")

    def tokens(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokens(letter)
        if len(ids) != 1:
            raise SpeederError(f"the tokenizer splits the candidate letter {letter!r} into {len(ids)} tokens; "
                               "Speeder's answers must be single tokens")
        return ids[0]

    def cue(self, recency: int) -> str:
        # No trailing space: a lone space is a token of its own in byte-level BPEs (prompt length is the cost).
        if not self.options.relative_position_cues:
            return "item:"
        if recency == 0:
            return "most recent:"
        return f"{recency} interaction{'s' if recency > 1 else ''} ago:"

    def build(self, histories: Sequence[np.ndarray], choices: Sequence[np.ndarray] | None = None,
              choice_targets: Sequence[int] | None = None) -> PromptBatch:
        n_tok, max_len = self.options.n_item_tokens, self.options.max_len
        rows: list[tuple[list[int], list[int], list[int], list[int], int, int]] = []
        for row, history in enumerate(histories):
            history = np.asarray(history, dtype=np.int64)
            history = history[history > 0][-max_len:]
            ids, items, subs, positions = [], [], [], []

            def text(piece: str, ids: list[int] = ids, items: list[int] = items, subs: list[int] = subs,
                     positions: list[int] = positions) -> None:
                tokens = self.tokens(piece)
                ids.extend(tokens)
                items.extend([0] * len(tokens))
                subs.extend([0] * len(tokens))
                positions.extend([-1] * len(tokens))

            def item(item_id: int, position: int, ids: list[int] = ids, items: list[int] = items,
                     subs: list[int] = subs, positions: list[int] = positions) -> None:
                ids.extend([self.pad_id] * n_tok)
                items.extend([int(item_id)] * n_tok)
                subs.extend(range(n_tok))
                positions.extend([position] * n_tok)

            text(self.HEADER)
            for offset, item_id in enumerate(history):
                recency = len(history) - 1 - offset
                text(self.cue(recency))
                item(int(item_id), max_len - 1 - recency)  # end-aligned absolute position
                text("\n")
            text(self.RETRIEVAL)
            retrieval = len(ids) - 1
            choice = -1
            if choices is not None:
                text(self.CANDIDATES)
                # "A<i>B<i>...": a letter is one token (checked in __init__), so a candidate costs
                # n_item_tokens + 1 prompt tokens; brackets and a newline each would add three more.
                for letter, candidate in zip(LETTERS, choices[row], strict=False):
                    text(letter)
                    item(int(candidate), -1)
                text("\n" + self.ANSWER)
                choice = len(ids) - 1
            rows.append((ids, items, subs, positions, retrieval, choice))
        length = max(len(r[0]) for r in rows)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (length - len(values))

        input_ids = torch.tensor([pad(r[0], self.pad_id) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (length - len(r[0])) for r in rows])
        batch = PromptBatch(input_ids, mask, torch.tensor([pad(r[1], 0) for r in rows]),
                            torch.tensor([pad(r[2], 0) for r in rows]), torch.tensor([pad(r[3], -1) for r in rows]),
                            torch.tensor([r[4] for r in rows]), None, None)
        if choices is not None:
            batch.choice_index = torch.tensor([r[5] for r in rows])
            if choice_targets is not None:
                batch.choice_target = torch.as_tensor(np.asarray(choice_targets), dtype=torch.long)
        return batch


# -- the model ---------------------------------------------------------------------------------------------

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


# -- data: examples, choice candidates ---------------------------------------------------------------------

def uniform_unseen(seen: np.ndarray, n_items: int, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` distinct items in 1..n_items not in ``seen``."""
    seen_set = set(int(i) for i in seen)
    if n_items - len(seen_set) < num:
        raise SpeederError(f"only {n_items - len(seen_set)} unseen items left; need {num}")
    chosen: list[int] = []
    while len(chosen) < num:
        for item in rng.integers(1, n_items + 1, size=2 * num):
            item = int(item)
            if item not in seen_set:
                seen_set.add(item)
                chosen.append(item)
                if len(chosen) == num:
                    break
    return np.array(chosen, dtype=np.int64)


@dataclass
class TrainingBatch:
    prompts: PromptBatch
    targets: torch.Tensor
    negatives: torch.Tensor


def sample_training_batch(model: Speeder, train_sequences: Sequence[np.ndarray], users: np.ndarray,
                          n_items: int, rng: np.random.Generator, with_choices: bool = True) -> TrainingBatch:
    """A random cut point per user: the ``max_len`` items before it are the history, the item at it the target."""
    n_choices = model.options.n_choices
    histories, targets, choices, answers = [], [], [], []
    for user in users:
        seq = train_sequences[int(user)]
        cut = int(rng.integers(1, len(seq)))
        histories.append(seq[:cut])
        targets.append(int(seq[cut]))
        if with_choices:
            listed = np.concatenate([[seq[cut]], uniform_unseen(seq, n_items, n_choices - 1, rng)])
            order = rng.permutation(n_choices)
            choices.append(listed[order])
            answers.append(int(np.flatnonzero(order == 0)[0]))
    prompts = model.prompts.build(histories, choices if with_choices else None, answers if with_choices else None)
    negatives = rng.integers(1, n_items + 1, size=model.options.train_negatives)
    return TrainingBatch(prompts, torch.tensor(targets), torch.from_numpy(negatives))


def choice_candidates(split: LeaveOneOutSplit, users: np.ndarray, stage: Stage, n_choices: int, seed: int,
                      cache_dir: Path | None = None,
                      negatives: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 20-candidate lists: the held-out item + ``n_choices - 1`` negatives from our evaluator's cache
    (the same cached draw every model is scored on), shuffled per user with a seeded generator.

    ``negatives`` ((U, >= n_choices - 1), aligned with ``users``) overrides the cached draw, e.g. the first 19
    of the sampled-100 negatives, so a benchmark scores every model on the very same lists.
    Returns ``(candidates (U, n_choices), positive index (U,))``.
    """
    if negatives is None:
        evaluator = SampledRankingEvaluator(split, num_negatives=n_choices - 1, seed=seed, cache_dir=cache_dir)
        negatives = evaluator.negatives[np.asarray(users, dtype=np.int64)]
    if negatives.shape != (len(users), negatives.shape[1]) or negatives.shape[1] < n_choices - 1:
        raise SpeederError(f"negatives of shape {negatives.shape} for {len(users)} users; need >= {n_choices - 1} "
                           "per user")
    out = np.zeros((len(users), n_choices), dtype=np.int64)
    answer = np.zeros(len(users), dtype=np.int64)
    for row, user in enumerate(users):
        _, target = split.inputs_and_target(int(user), stage)
        listed = np.concatenate([[target], negatives[row, :n_choices - 1]])
        order = np.random.default_rng([seed, int(user)]).permutation(n_choices)
        out[row] = listed[order]
        answer[row] = int(np.flatnonzero(order == 0)[0])
    return out, answer


def validity_aware_hit_at_1(logits: torch.Tensor, letter_ids: Sequence[int], answers: torch.Tensor,
                            n_listed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answer = arg-max over the whole vocabulary. Returns (hit (B,), valid (B,)) as float tensors:
    an answer that is not the letter of one of the ``n_listed`` candidates is invalid and a miss."""
    predicted = logits.argmax(dim=-1)
    letters = torch.tensor(list(letter_ids)[:n_listed], device=logits.device)
    valid = (predicted[:, None] == letters[None, :]).any(dim=1)
    hit = predicted == letters[answers.to(logits.device)]
    return (hit & valid).float(), valid.float()


@torch.no_grad()
def evaluate_choice(model: Speeder, split: LeaveOneOutSplit, stage: Stage, users: np.ndarray, seed: int = 42,
                    batch_size: int = 16, cache_dir: Path | None = None,
                    negatives: np.ndarray | None = None) -> dict[str, float]:
    """Validity-aware Hit@1 over ``n_choices`` listed candidates (one LLM pass per user)."""
    n = model.options.n_choices
    candidates, answers = choice_candidates(split, users, stage, n, seed, cache_dir, negatives)
    was_training = model.training
    model.eval()
    hits, valids = [], []
    try:
        for start in range(0, len(users), batch_size):
            chunk = slice(start, start + batch_size)
            histories = [split.inputs_and_target(int(u), stage)[0] for u in users[chunk]]
            batch = model.prompts.build(histories, candidates[chunk], answers[chunk])
            logits = model.choice_logits(model.hidden_states(batch), batch)
            hit, valid = validity_aware_hit_at_1(logits, model.prompts.letter_ids, torch.from_numpy(answers[chunk]), n)
            hits.append(hit.cpu())
            valids.append(valid.cpu())
    finally:
        model.train(was_training)
    hit_all, valid_all = torch.cat(hits), torch.cat(valids)
    return {"hit@1": float(hit_all.mean()), "valid_answer_rate": float(valid_all.mean())}


# -- MPO training ------------------------------------------------------------------------------------------

@dataclass
class StageRecord:
    name: str
    modalities: list[str]
    lora: bool
    steps: int
    seconds: float
    samples_per_s: float
    trainable_parameters: int
    first_loss: float
    last_loss: float
    first_retrieval_loss: float  # the retrieval term alone: comparable between batches with and without choices
    last_retrieval_loss: float
    valid: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_users(split: LeaveOneOutSplit) -> np.ndarray:
    lengths = np.array([len(s) for s in split.train_sequences])
    return np.flatnonzero(lengths >= 2)


def validate(model: Speeder, split: LeaveOneOutSplit, users: np.ndarray, evaluator: SampledRankingEvaluator,
             seed: int, batch_size: int = 16) -> dict[str, float]:
    """Sampled H@10/N@10 and choice Hit@1 on validation ``users``."""
    summary = evaluator.evaluate(model, "valid", users=users).summary()
    out = {k: summary[k] for k in ("hit@10", "ndcg@10") if k in summary}
    out.update({f"choice_{k}": v for k, v in evaluate_choice(model, split, "valid", users, seed, batch_size).items()})
    return out


def train_speeder(model: Speeder, split: LeaveOneOutSplit, options: SpeederTrainingOptions, seed: int,
                  evaluator: SampledRankingEvaluator | None = None, users: np.ndarray | None = None,
                  valid_users: np.ndarray | None = None, progress: Any = None,
                  log: Any = None) -> list[StageRecord]:
    """MPO: run the stages in order, each from the previous one's weights; validation after each stage.

    ``users`` restricts training to those users; ``log(record_dict)`` is called after each stage.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pool = train_users(split) if users is None else np.asarray(users)
    if valid_users is None:
        valid_users = split.eval_users[:options.valid_users]
    if evaluator is None:
        evaluator = SampledRankingEvaluator(split, seed=42, ks=(10,), batch_size=16)
    train = split.train_sequences
    choice_weight, choice_fraction = model.options.choice_loss_weight, model.options.choice_fraction
    records: list[StageRecord] = []
    for stage in options.stages:
        params = model.set_stage(stage)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=options.weight_decay)
        model.train()
        losses: list[float] = []
        retrieval_losses: list[float] = []
        task = progress.add_task(f"speeder stage {stage.name}", total=stage.steps) if progress is not None else None
        start = time.perf_counter()
        for _ in range(stage.steps):
            batch_users = rng.choice(pool, size=min(options.batch_size, len(pool)), replace=False)
            with_choices = choice_weight > 0 and bool(rng.random() < choice_fraction)
            batch = sample_training_batch(model, train, batch_users, split.dataset.n_items, rng, with_choices)
            parts = model.loss(batch.prompts, batch.targets, batch.negatives)
            loss = parts["loss"]
            retrieval_losses.append(float(parts["retrieval"].detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if options.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"speeder stage {stage.name} loss {losses[-1]:.3f}")
        seconds = time.perf_counter() - start
        valid = validate(model, split, valid_users, evaluator, evaluator.seed) if len(valid_users) else {}
        def mean_of(values: list[float], tail: bool) -> float:
            part = max(1, len(values) // 5)  # first / last fifth of the stage's steps
            return float(np.mean(values[-part:] if tail else values[:part])) if values else float("nan")

        record = StageRecord(stage.name, list(stage.modalities), stage.lora, stage.steps, seconds,
                             stage.steps * options.batch_size / seconds if seconds > 0 and stage.steps else 0.0,
                             sum(p.numel() for p in params), mean_of(losses, False), mean_of(losses, True),
                             mean_of(retrieval_losses, False), mean_of(retrieval_losses, True), valid)
        records.append(record)
        if log is not None:
            log(record.as_dict())
    model.eval()
    return records


# -- inputs: semantics and the collaborative table ----------------------------------------------------------

def load_modality_features(options: SpeederOptions, dataset: SequenceDataset,
                           collaborative: np.ndarray | None) -> dict[str, np.ndarray]:
    """text / visual (and collaborative) matrices in ``dataset``'s item-id order (row 0 = padding)."""
    from prismrec.models.enhancers.adapters import load_semantic_matrices

    matrices = load_semantic_matrices(options.semantics, dataset, [options.text_matrix, options.image_matrix])
    features = {"text": matrices[options.text_matrix], "visual": matrices[options.image_matrix]}
    if options.collaborative == "sasrec":
        if collaborative is None:
            raise SpeederError("collaborative = 'sasrec' needs a SASRec item table (model.sasrec_run)")
        if collaborative.shape[0] != dataset.n_items + 1:
            raise SpeederError(f"collaborative table has {collaborative.shape[0]} rows; the dataset has "
                               f"{dataset.n_items} items + padding")
        features["collaborative"] = collaborative.astype(np.float32)
    return features


def collaborative_table_from_sasrec_run(run_dir: Path, dataset: SequenceDataset) -> np.ndarray:
    """The (frozen) item embedding table of a SASRec run trained on this very dataset."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path, weights = run_dir / "meta.json", run_dir / "model.safetensors"
    for path in (meta_path, weights):
        if not path.exists():
            raise SpeederError(f"{path}: missing; model.sasrec_run must be a finished SASRec run directory")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("data_fingerprint") != dataset.fingerprint:
        raise SpeederError(f"{meta_path}: trained on data {meta.get('data_fingerprint')}, not on this dataset "
                           f"({dataset.fingerprint}); train SASRec on the same data and filters")
    state = load_file(str(weights))
    key = "item_encoder.embedding.weight"
    if key not in state:
        raise SpeederError(f"{weights}: no {key!r}; is this a SASRec run?")
    table = state[key].float().numpy().copy()
    table[0] = 0.0
    return table


def train_sasrec_table(split: LeaveOneOutSplit, seed: int = 42, max_epochs: int = 20, hidden_size: int = 64,
                       run_dir: Path | None = None, quiet: bool = True) -> tuple[np.ndarray, Path]:
    """Train a small SASRec with the project's Trainer on the training split; return its item table."""
    from prismrec.config import RunConfig
    from prismrec.models.backbones.sasrec import SASRecConfig
    from prismrec.training.trainer import Trainer

    config = RunConfig(name="speeder-collaborative-sasrec", seed=seed,
                       data={"dataset": split.dataset.name},
                       model=SASRecConfig(hidden_size=hidden_size, max_len=50),
                       training={"max_epochs": max_epochs, "patience": max_epochs, "batch_size": 128},
                       evaluation={"full_ranking": False})
    outcome = Trainer(config, split=split, run_dir=run_dir, quiet=quiet).fit()
    return collaborative_table_from_sasrec_run(outcome.run_dir, split.dataset), outcome.run_dir


def tokens_per_item(options: SpeederOptions) -> int:
    """Prompt tokens that represent one item (the compressed representation)."""
    return options.n_item_tokens


def prompt_length_stats(model: Speeder, histories: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean prompt tokens of a ranking prompt (the one pass that scores every candidate)."""
    lengths = [model.prompts.build([h]).n_tokens for h in histories]
    return {"mean_prompt_tokens": float(np.mean(lengths)) if lengths else math.nan}


# -- a whole run (what ``prismrec speeder train`` does) --------------------------------------------------

SPEEDER_WEIGHTS = "speeder.safetensors"


def load_run_config(path: Path | str | None, overrides: Sequence[str] = ()) -> SpeederRunConfig:
    """Read a Speeder TOML (or defaults) with ``section.key=value`` overrides; errors name the file and key."""
    from prismrec.options import load_typed_config

    return load_typed_config(SpeederRunConfig, path, overrides)


def fit_run(config: SpeederRunConfig, run_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train Speeder (MPO stages) and evaluate it; everything lands in a run directory.

    ``run_dir`` (default ``$PRISMREC_HOME/runs/<name>-<timestamp>``) receives ``config.toml``, ``meta.json``
    (seed, package versions, data fingerprint), ``stages.jsonl`` (one line per MPO stage with its
    validation metrics), ``speeder.safetensors`` (MRC, position embeddings, scoring head; the LLM is not
    copied), ``lora/`` (the adapter, via llmrec.causal_lm), ``final.json`` (test/valid metrics).
    """
    import platform
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    from prismrec.data.loaders import load_sequences
    from prismrec.llmrec.causal_lm import CausalLMOptions, LoRAOptions, add_lora, load_causal_lm, save_lora_adapter
    from prismrec.options import dump_toml
    from prismrec.training.runs import new_run_dir, package_versions, write_json

    console = Console(stderr=True, quiet=quiet)
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    split = LeaveOneOutSplit(load_sequences(config.data.dataset, config.data.data_dir))
    dataset = split.dataset
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(config.model_dump(mode="json")), encoding="utf-8")
    meta: dict[str, Any] = {"seed": config.seed, "data_fingerprint": dataset.fingerprint,
                            "n_users": dataset.n_users, "n_items": dataset.n_items, "packages": package_versions(),
                            "platform": platform.platform(), "command": sys.argv,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    collaborative = None
    if config.model.collaborative == "sasrec":
        if config.model.sasrec_run is not None:
            collaborative = collaborative_table_from_sasrec_run(config.model.sasrec_run, dataset)
            meta["sasrec_run"] = str(config.model.sasrec_run)
        else:
            console.print("training the SASRec that gives the collaborative embeddings")
            collaborative, sasrec_dir = train_sasrec_table(split, seed=config.seed, quiet=quiet)
            meta["sasrec_run"] = str(sasrec_dir)
    write_json(run_dir / "meta.json", meta)
    features = load_modality_features(config.model, dataset, collaborative)
    llm, tokenizer = load_causal_lm(CausalLMOptions(model=config.llm.model))
    lora = LoRAOptions(r=config.llm.lora_r, alpha=config.llm.lora_alpha, dropout=config.llm.lora_dropout)
    torch.manual_seed(config.seed)
    llm = add_lora(llm, lora)
    model = Speeder(llm, tokenizer, features, config.model)
    ev = config.evaluation
    evaluator = SampledRankingEvaluator(split, ev.num_negatives, ev.negative_seed, ev.ks, ev.batch_size)
    stages_log = (run_dir / "stages.jsonl").open("w", encoding="utf-8")

    def log(record: dict[str, Any]) -> None:
        stages_log.write(json.dumps(record) + "\n")
        stages_log.flush()

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=quiet)
    with progress, stages_log:
        records = train_speeder(model, split, config.training, config.seed, evaluator=evaluator,
                                valid_users=split.eval_users[:config.training.valid_users], progress=progress,
                                log=log)
    save_file(model.own_state(), str(run_dir / SPEEDER_WEIGHTS))
    save_lora_adapter(model.llm, run_dir / "lora", lora)
    users = split.eval_users if ev.users is None else split.eval_users[:ev.users]
    final: dict[str, dict[str, float]] = {}
    for stage in ("valid", "test"):
        final[f"{stage}/sampled"] = evaluator.evaluate(model, stage, users=users).summary()
        final[f"{stage}/choice"] = evaluate_choice(model, split, stage, users, ev.negative_seed, ev.batch_size)
    summary = {"metrics": final, "stages": [r.as_dict() for r in records], "evaluated_users": len(users),
               "train_seconds": sum(r.seconds for r in records)}
    write_json(run_dir / "final.json", summary)
    return {"run_dir": run_dir, **summary}
