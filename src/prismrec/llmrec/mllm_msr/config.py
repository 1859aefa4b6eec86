"""MLLM-MSR options: how items are written (step 1), how users are summarised (step 2), the recommender and its
LoRA fine-tuning (step 3), and the whole ``prismrec mllm-msr train`` run (:class:`MLLMMSRConfig`, read by
:func:`load_mllm_msr_config`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prismrec.config import DataConfig, EvaluationConfig
from prismrec.llmrec.causal_lm import CausalLMOptions, LoRAOptions
from prismrec.options import StrictModel, config_errors, load_typed_config
from prismrec.semantics.backends.base import BACKENDS


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
    reuse_prompt_prefix: bool = Field(True, description="text-only LLMs: run the prompt part that a user's "
                                      "candidates share (summary, recent items) once and reuse its KV cache for "
                                      "every candidate, in scoring and in training; same scores, fewer tokens")
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


def load_mllm_msr_config(path: Path | str | None, overrides: Sequence[str] = ()) -> MLLMMSRConfig:
    """TOML file (or defaults) + ``section.key=value`` overrides -> validated config (ConfigError otherwise)."""
    config = load_typed_config(MLLMMSRConfig, path, overrides)
    with config_errors(str(path or "command-line overrides")):  # an unknown backend name, or its bad options
        config.model.summaries.validated_backend_options()
    return config
