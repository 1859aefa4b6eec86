"""MLLM-MSR (Ye et al., "Harnessing MLLMs for Multimodal Sequential Recommendation"): the LLM *is* the recommender.

The paper's three steps, as implemented here (the seed text is an abstract and summary; where it is silent
we follow the public description of its code and record the choice):

1. **Item summaries** (paper: MLLM item summariser turns each image into text). We read the image summary
   from a finished derivation artefact (``prismrec derive``; route ``visual`` by default, cached like every
   derivation) and join it with the item's title and attributes
   (:class:`~prismrec.llmrec.mllm_msr.prompts.ItemTexts`). Without an artefact the item is its attributes
   only. Long texts are capped (``max_summary_words``): prompt length is the cost on CPU.
2. **Recurrent user-preference summaries** (paper Figure 2). A user's history is cut into blocks of
   ``block_size`` items (default 3); the first block is summarised into a preference statement, then each
   next block is given to the LLM with the previous summary for an updated one
   (:class:`~prismrec.llmrec.mllm_msr.summaries.UserSummariser`).
   Answers are asked to start with "The user appears to have a preference for". Every call goes through
   the semantic backends (``local-llm``, ``transformers``, ``openai``) and the SQLite
   :class:`~prismrec.semantics.cache.SemanticCache` ``generations`` table (recorded with
   ``item = "user:<id>"`` and ``turn = block index``). Choice: the history is capped to its last
   ``max_history`` items *counted at the end of the user's training sequence* (the window's start is fixed
   per user), so the validation and test windows extend the training window: their summaries reuse every
   cached block and add one call for the last block.
3. **Recommender** (paper Figure 3, SFT with LoRA; :class:`~prismrec.llmrec.mllm_msr.recommender.MLLMMSR`).
   Prompt = user summary + the ``recent_items`` last items
   + the candidate's summary (and its image, for a multimodal LLM: see below) + "Will the user interact with
   the candidate item? Answer yes or no.".
   Fine-tuned with LoRA (peft; r=16, alpha=32, dropout 0.1, lr 2e-5 by default) on the training split:
   per user the last ``positives_per_user`` training items are positives ("yes"), each with
   ``negatives_per_positive`` sampled items the user never interacted with ("no"); the loss is the
   language-model cross-entropy on the answer token only (the paper's L = -sum log P(v_i | v_<i, I) with
   the prompt masked). Score = p(yes) / (p(yes) + p(no)) from the next-token logits, in batches.
4. **Evaluation** through :class:`~prismrec.evaluation.SampledRankingEvaluator`
   (:class:`~prismrec.llmrec.mllm_msr.scoring.MLLMMSRScorer` adapts the recommender to the evaluators'
   ``score(inputs, candidates)``): the same cached 100
   negatives per user as DMESR, or ``num_negatives = 20`` (MLLM-MSR's own protocol). Full ranking is out
   of reach (one LLM forward per candidate) and refused.

Candidate images: when the recommender's LLM is multimodal (a Qwen2.5-VL folder, loaded by
:func:`~prismrec.llmrec.causal_lm.load_causal_lm`) and ``candidate_image`` is on (default), the candidate's
image (``SequenceDataset.image_path``) is attached to its prompt, right after "Candidate item:" and before
its text (template ``mllm-msr-recommend-image``), for LoRA training and for scoring alike, batched: the
images of a batch go through the PIL image processor together and each placeholder is expanded to its
image tokens (:func:`~prismrec.llmrec.causal_lm.image_text_inputs`, no torchvision). Images are shrunk to
``image_max_side`` pixels (224) on their longer side first (vision tokens are the cost on CPU) and kept in
a small in-memory LRU. A candidate without an image, or whose file cannot be read (a warning names the item
and the file, once), gets the text-only prompt; :class:`~prismrec.llmrec.mllm_msr.recommender.CandidateImages`
records which and why, and the run's ``final.json`` reports it. LoRA adapts the language model only: the
vision tower stays frozen. A text-only LLM ignores ``candidate_image`` (its image reaches it as the summary
of step 1).

Reusable pieces for benchmarks (``benchmarks/mllm_msr.py``, ``benchmarks/speeder_vs_mllm_msr.py``):
:func:`~prismrec.llmrec.mllm_msr.scoring.train_and_score` (train on some users, score given candidates,
return scores and timings).

The modules, each importing only those listed before it:

* :mod:`~prismrec.llmrec.mllm_msr.config`: the options (items, summaries, recommender, training, the whole
  run) and :func:`~prismrec.llmrec.mllm_msr.config.load_mllm_msr_config`;
* :mod:`~prismrec.llmrec.mllm_msr.prompts`: the versioned prompt templates, step 1's item texts and the
  recommender prompt;
* :mod:`~prismrec.llmrec.mllm_msr.summaries`: step 2 (recurrent user summaries);
* :mod:`~prismrec.llmrec.mllm_msr.recommender`: step 3 (the LoRA-tuned yes/no recommender, candidate images);
* :mod:`~prismrec.llmrec.mllm_msr.scoring`: training samples, the evaluators' adapter (step 4) and
  ``train_and_score``;
* :mod:`~prismrec.llmrec.mllm_msr.run`: run directories (``prismrec mllm-msr train`` / ``evaluate``).

Every public name of these modules is re-exported here (``from prismrec.llmrec.mllm_msr import ...``).
"""

from prismrec.llmrec.mllm_msr.config import (
    ItemTextOptions,
    MLLMMSRConfig,
    MLLMMSROptions,
    MLLMMSRTrainingOptions,
    SummaryOptions,
    load_mllm_msr_config,
)
from prismrec.llmrec.mllm_msr.prompts import (
    EMPTY_HISTORY_SUMMARY,
    IMAGE_MARKER,
    RECOMMEND,
    RECOMMEND_WITH_IMAGE,
    SUMMARY_PREFIX,
    USER_SUMMARY_FIRST,
    USER_SUMMARY_UPDATE,
    ItemTexts,
    RecommenderPrompt,
    prompt_text,
)
from prismrec.llmrec.mllm_msr.recommender import MLLMMSR, CandidateImages, PromptSample, common_prefix_length
from prismrec.llmrec.mllm_msr.run import evaluate_mllm_msr_run, load_split, run_mllm_msr
from prismrec.llmrec.mllm_msr.scoring import (
    MLLMMSRScorer,
    TrainScoreResult,
    build_training_samples,
    fit_with_progress,
    negatives_for,
    sample_users,
    train_and_score,
    training_windows,
)
from prismrec.llmrec.mllm_msr.summaries import SummaryError, SummaryStep, UserSummariser, build_summariser

__all__ = [
    "EMPTY_HISTORY_SUMMARY",
    "IMAGE_MARKER",
    "MLLMMSR",
    "RECOMMEND",
    "RECOMMEND_WITH_IMAGE",
    "SUMMARY_PREFIX",
    "USER_SUMMARY_FIRST",
    "USER_SUMMARY_UPDATE",
    "CandidateImages",
    "ItemTextOptions",
    "ItemTexts",
    "MLLMMSRConfig",
    "MLLMMSROptions",
    "MLLMMSRScorer",
    "MLLMMSRTrainingOptions",
    "PromptSample",
    "RecommenderPrompt",
    "SummaryError",
    "SummaryOptions",
    "SummaryStep",
    "TrainScoreResult",
    "UserSummariser",
    "build_summariser",
    "build_training_samples",
    "common_prefix_length",
    "evaluate_mllm_msr_run",
    "fit_with_progress",
    "load_mllm_msr_config",
    "load_split",
    "negatives_for",
    "prompt_text",
    "run_mllm_msr",
    "sample_users",
    "train_and_score",
    "training_windows",
]
