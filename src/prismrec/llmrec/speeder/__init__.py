"""Speeder: compressed multimodal item tokens for an LLM sequential recommender (seed ``001_7ca126ee1b30b0fc``).

The LLM *is* the recommender, as in MLLM-MSR (:mod:`prismrec.llmrec.mllm_msr`), but every item in the
prompt is a handful of soft tokens (default one) instead of its long textual description, so a prompt
with a 20-item history and 20 candidates is ~200 tokens and one LLM pass scores any number of candidates.

The seed paper is an abstract; its three components are built as below, and every detail it leaves open
is a choice recorded here (all switchable in :class:`~prismrec.llmrec.speeder.config.SpeederOptions` /
:class:`~prismrec.llmrec.speeder.config.SpeederTrainingOptions`).

**Modules** (every public name is re-exported here, so ``from prismrec.llmrec.speeder import X`` works):

* :mod:`~prismrec.llmrec.speeder.config`: :class:`SpeederError`, the options and the run configuration
  (``SpeederOptions``, ``StageOptions``, ``default_stages``, ``SpeederRunConfig``, ``load_run_config``, ...);
* :mod:`~prismrec.llmrec.speeder.compression`: MRC (``ModalityExpert``, ``MixtureOfModalityExperts``);
* :mod:`~prismrec.llmrec.speeder.prompts`: the prompt layout and SPAE's relative cues (``PromptBuilder``,
  ``PromptBatch``);
* :mod:`~prismrec.llmrec.speeder.model`: the :class:`Speeder` module (LLM + MRC + SPAE's absolute position
  embeddings, retrieval and choice scoring, the loss, per-stage parameters);
* :mod:`~prismrec.llmrec.speeder.choice`: the choice task (``choice_candidates``, ``validity_aware_hit_at_1``,
  ``evaluate_choice``);
* :mod:`~prismrec.llmrec.speeder.training`: MPO (``train_speeder``, ``validate``, ``StageRecord``) and the
  training examples (``sample_training_batch``, ``uniform_unseen``, ``train_users``);
* :mod:`~prismrec.llmrec.speeder.run`: MRC's inputs (``load_modality_features``,
  ``collaborative_table_from_sasrec_run``, ``train_sasrec_table``), prompt-cost figures (``tokens_per_item``,
  ``prompt_length_stats``) and a whole run (``fit_run``).

**Multimodal Representation Compression (MRC)**
(:class:`~prismrec.llmrec.speeder.compression.MixtureOfModalityExperts`)

* Inputs per item (frozen): the *text* embedding (default: the semantics artefact's ``text`` matrix, the
  MiniLM embedding of the derived textual description, i.e. the very description MRC replaces in the
  prompt), the *image* embedding (default: the artefact's ``image`` matrix, EfficientNet-Lite0 poster
  features; ``visual`` can be named instead) and the *collaborative* embedding
  (:func:`~prismrec.llmrec.speeder.run.load_modality_features`).
* Collaborative embedding: by default the item table of a SASRec model trained on the *training* split
  (``collaborative = "sasrec"``: frozen, loaded from a run directory with
  :func:`~prismrec.llmrec.speeder.run.collaborative_table_from_sasrec_run`, or trained on the spot with
  :func:`~prismrec.llmrec.speeder.run.train_sasrec_table`);
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

**Modality-aware Progressive Optimisation (MPO)** (:func:`~prismrec.llmrec.speeder.training.train_speeder`)

* Stages (default three): ``text`` (text expert only), ``text+visual`` (adds the visual expert),
  ``full`` (adds the collaborative expert and unfreezes the LoRA adapters). Each stage continues from the
  previous one's weights; experts added earlier *stay trainable* (the gate and earlier experts adapt to
  the newcomer). The LLM's own weights are always frozen; the LoRA adapters (peft, via
  :mod:`prismrec.llmrec.causal_lm`) are attached at construction (their B matrices are zero, so they
  are a no-op) and only receive gradients in a stage with ``lora = true``
  (:meth:`~prismrec.llmrec.speeder.model.Speeder.set_stage`).
* Each stage runs ``steps`` optimiser steps with a fresh AdamW over exactly the parameters that stage
  trains (the parameter set changes between stages, so moment estimates would not carry over anyway);
  after each stage the validation metrics (sampled H@10 / N@10 and the 20-candidate Hit@1) are recorded.

**Sequential Position Awareness Enhancement (SPAE)** (cues: :mod:`~prismrec.llmrec.speeder.prompts`;
position embeddings: :mod:`~prismrec.llmrec.speeder.model`)

* Relative cues (``relative_position_cues``): each history item is preceded by "most recent:" or
  "k interactions ago:" (k = 1 for the item before the most recent one); off: by "item:". No trailing
  space after a cue or a candidate letter (a lone space costs a token in byte-level BPEs).
* Absolute position embeddings (``absolute_position_embeddings``): a learned ``nn.Embedding(max_len, H)``
  added to the history items' soft tokens. Positions are aligned to the end of the history, like SASRec's
  left-padded positions (the most recent item always has index ``max_len - 1``), so a position means the
  same recency for every user whatever the history length. Initialised at zero, so switching the option on
  never perturbs the untrained prompt. Candidate items get no position embedding.

**Prompt** (:class:`~prismrec.llmrec.speeder.prompts.PromptBuilder`; no chat template: the model is fine-tuned
on this layout; items are soft tokens ``<i>``)::

    A user interacted with these items, oldest first:
    19 interactions ago:<i>
    ...
    most recent:<i>
    The next item is:                  <- retrieval position (hidden state h)
    Candidates:
    A<i>B<i>...T<i>
    Answer: (                          <- choice position (LM head)

**Task and scoring** (:class:`~prismrec.llmrec.speeder.model.Speeder`, :mod:`~prismrec.llmrec.speeder.choice`)

* Ranking (sampled-100 / full, our evaluators): score(u, i) = s * cos(W h_u, t_i), h_u = the LLM's final
  hidden state at the retrieval position, t_i = the mean of item i's soft tokens, W a learned H x H map,
  s a learned logit scale (init 10). The prompt stops at the retrieval position for ranking, so one LLM
  pass per *user* scores all its candidates: the cheapest faithful option (a yes/no logit per candidate
  would need one pass per candidate, which is MLLM-MSR's cost we are measuring against). Item tokens are
  tied between the prompt and the output side, as SASRec ties its input and output item embeddings.
* Choice (Hit@1 over 20 candidates, the Speeder authors' validity-aware metric): the candidates are listed
  in the prompt with letters A.. in a per-user seeded shuffled order; the model's answer is the arg-max
  token over the *whole* vocabulary at the choice position (greedy first token). An answer that is not one
  of the listed candidates' letters is invalid and counts as a miss
  (:func:`~prismrec.llmrec.speeder.choice.validity_aware_hit_at_1`).
* Training loss (one LLM pass per example): sampled softmax of the positive against ``train_negatives``
  uniform items shared by the batch (the retrieval head), plus, in a ``choice_fraction`` share of the
  batches (default half; drawn per batch so a batch's prompts have similar lengths), ``choice_loss_weight``
  * cross-entropy over the full vocabulary for the correct letter at the choice position (the LM head only
  runs at that one position, never over the whole sequence). The candidate list is ~2 tokens per candidate
  (a letter and the soft token), 40+ tokens for 20, about as long as the 10-item history with its cues, so
  listing it in every training prompt would nearly double the training cost for the one metric that needs
  it; the retrieval loss, which every metric but Hit@1 uses, runs every step.
* Training examples (:func:`~prismrec.llmrec.speeder.training.sample_training_batch`): a random training user
  (users with >= 2 training items), a random cut point t >= 1 of their training sequence, history = the
  ``max_len`` items before t, target = item t; the 19 choice negatives are uniform items the user never
  interacted with in training.

**Runs** (:func:`~prismrec.llmrec.speeder.run.fit_run`, ``prismrec speeder train``): Speeder is not in the
``MODELS`` registry, because the generic :class:`~prismrec.training.Trainer` trains one parameter set with one
optimiser while MPO switches parameter sets between stages and the LLM is loaded through
:mod:`~prismrec.llmrec.causal_lm`; it implements the evaluators' ``Scorer`` protocol (``max_len``, ``score``)
so it is scored by the same evaluators and cached negatives as every other model. The LLM's weights are not
copied into the run: ``speeder.safetensors`` holds Speeder's own modules and ``lora/`` the adapter (no pickle
anywhere).

**Not done**: images are never given to the LLM as pixels (the image *embedding* is an MRC input; that
is the paper's point); multi-token generation is not needed because answers are single letters.
"""

from prismrec.llmrec.speeder.choice import choice_candidates, evaluate_choice, validity_aware_hit_at_1
from prismrec.llmrec.speeder.compression import MixtureOfModalityExperts, ModalityExpert
from prismrec.llmrec.speeder.config import (
    MODALITIES,
    LLMSpec,
    Modality,
    SpeederDataOptions,
    SpeederError,
    SpeederEvaluationOptions,
    SpeederOptions,
    SpeederRunConfig,
    SpeederTrainingOptions,
    StageOptions,
    default_stages,
    load_run_config,
)
from prismrec.llmrec.speeder.model import Speeder
from prismrec.llmrec.speeder.prompts import LETTERS, PromptBatch, PromptBuilder
from prismrec.llmrec.speeder.run import (
    SPEEDER_WEIGHTS,
    collaborative_table_from_sasrec_run,
    fit_run,
    load_modality_features,
    prompt_length_stats,
    tokens_per_item,
    train_sasrec_table,
)
from prismrec.llmrec.speeder.training import (
    StageRecord,
    TrainingBatch,
    sample_training_batch,
    train_speeder,
    train_users,
    uniform_unseen,
    validate,
)

__all__ = [
    "LETTERS",
    "MODALITIES",
    "SPEEDER_WEIGHTS",
    "LLMSpec",
    "MixtureOfModalityExperts",
    "Modality",
    "ModalityExpert",
    "PromptBatch",
    "PromptBuilder",
    "Speeder",
    "SpeederDataOptions",
    "SpeederError",
    "SpeederEvaluationOptions",
    "SpeederOptions",
    "SpeederRunConfig",
    "SpeederTrainingOptions",
    "StageOptions",
    "StageRecord",
    "TrainingBatch",
    "choice_candidates",
    "collaborative_table_from_sasrec_run",
    "default_stages",
    "evaluate_choice",
    "fit_run",
    "load_modality_features",
    "load_run_config",
    "prompt_length_stats",
    "sample_training_batch",
    "tokens_per_item",
    "train_sasrec_table",
    "train_speeder",
    "train_users",
    "uniform_unseen",
    "validate",
    "validity_aware_hit_at_1",
]
