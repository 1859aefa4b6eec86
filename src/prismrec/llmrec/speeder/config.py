"""Speeder's options and run configuration, and the names every other Speeder module shares.

:class:`SpeederOptions` holds the switches of the three paper components (MRC inputs and shape, SPAE cues and
position embeddings) and the prompt and loss settings; :class:`StageOptions` and :func:`default_stages` describe
the MPO stages; :class:`SpeederRunConfig` is ``configs/movielens_speeder.toml``, read by :func:`load_run_config`.
Also :class:`SpeederError` and the modality names (``MODALITIES``). Imports no other Speeder module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prismrec.options import load_typed_config

Modality = Literal["text", "visual", "collaborative"]
MODALITIES: tuple[Modality, ...] = ("text", "visual", "collaborative")


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


def load_run_config(path: Path | str | None, overrides: Sequence[str] = ()) -> SpeederRunConfig:
    """Read a Speeder TOML (or defaults) with ``section.key=value`` overrides; errors name the file and key."""
    return load_typed_config(SpeederRunConfig, path, overrides)
