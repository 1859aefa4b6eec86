"""The run configuration: data, model, training and evaluation sections, loaded from TOML with ``--set a.b=value``.

Every section forbids unknown keys, so a typo (``training.lrr``) is an error naming the key instead of a
silently ignored option. The ``model`` section is validated by the config class of the model it names
(looked up in :data:`prismrec.models.MODELS`), so each model owns its options. This module sits one layer
above the models (it imports their registry; they import only :mod:`prismrec.options`, where
:class:`~prismrec.options.StrictModel`, :class:`~prismrec.options.ModelConfig`, :class:`~prismrec.options.ConfigError`
and the TOML helpers live).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator

from prismrec.models import MODELS
from prismrec.options import ModelConfig, StrictModel, read_with_overrides, validate_typed


class DataConfig(StrictModel):
    dataset: str = Field("movielens-small", description="registered dataset name")
    data_dir: Path | None = Field(None, description="folder holding one sub-folder per dataset")
    folder: str | None = Field(None, description="sub-folder of data_dir (default: the loader's own)")
    min_user_interactions: int = Field(1, ge=1)
    min_item_interactions: int = Field(1, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (validated by the loader)")


class TrainingConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(300, ge=0)
    patience: int = Field(20, ge=1, description="epochs without validation improvement before stopping")
    early_stopping_metric: str = Field("ndcg@10", description="validation metric (sampled mode) to maximise")
    loss: Literal["bce", "ce", "sampled_ce"] = Field(
        "bce", description="bce: one sampled negative per position (Eq. 7); ce: softmax cross-entropy over all "
        "items; sampled_ce: softmax over the target and num_negatives sampled items with the logQ correction "
        "(large catalogues)")
    num_negatives: int = Field(256, ge=1, description="sampled_ce: negatives drawn per batch, shared by its positions")
    negative_sampler: Literal["uniform", "popularity"] = Field(
        "uniform", description="sampled_ce: draw negatives uniformly or by training popularity (count + 1)")
    logq_correction: bool = Field(True, description="sampled_ce: lower each drawn item's logit by log(N q), so the "
                                  "sampled denominator estimates the full one (False: plain sampled negatives)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast the training forward pass to "
                                               "bfloat16 (CPU or CUDA); evaluation stays fp32")
    eval_every: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default)")
    device: str = Field("cpu")
    window: Literal["last", "sliding"] = Field("last", description="last: train on each user's most recent "
                                               "max_len items (SASRec's recipe); sliding: cut the whole history "
                                               "into max_len windows so every training interaction is a target")


# Options added after runs were already recorded: at their default they are left out of the config hash, so
# finished runs (and experiment cells) stay reusable when the option appears. Set to anything else, they count.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {
    ("training", "window"): "last",
    ("training", "num_negatives"): 256,
    ("training", "negative_sampler"): "uniform",
    ("training", "logq_correction"): True,
    ("training", "precision"): "fp32",
    ("evaluation", "full_ranking_users"): None,
    ("evaluation", "full_ranking_chunk"): 16384,
}


class EvaluationConfig(StrictModel):
    num_negatives: int = Field(100, ge=1)
    negative_seed: int = Field(42, description="seed of the sampled candidates, shared by every model")
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    batch_size: int = Field(256, ge=1)
    full_ranking: bool = True
    full_ranking_users: int | None = Field(
        None, ge=1, description="full ranking scores a seeded sample of this many users (the same for every "
        "model; recorded in final.json). None: all users up to 50,000, above that a sample of 50,000 with a warning")
    full_ranking_chunk: int = Field(16384, ge=1, description="items scored per matrix product in full ranking "
                                    "(memory: batch_size x this many floats); does not change the results")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(ks))


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    model: SerializeAsAny[ModelConfig]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_registry(cls, value: Any) -> Any:
        if isinstance(value, ModelConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError(f"[model] needs a 'name'; known models: {', '.join(MODELS.names())}")
        return MODELS.get(str(value["name"])).Config.model_validate(value)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)

    def config_hash(self) -> str:
        """Hash of the resolved configuration (used to recognise identical runs)."""
        return self._hash(self.to_dict())

    def settings_hash(self) -> str:
        """Hash of what the run computes: the resolved configuration without its ``name``, a label. Cells of
        different experiments with equal settings (Table 2's DMESR and the alpha sweep's alpha = 0.1) share it,
        so an experiment grid reuses one for the other."""
        resolved = self.to_dict()
        del resolved["name"]
        return self._hash(resolved)

    @staticmethod
    def _hash(resolved: dict[str, Any]) -> str:
        for (section, key), default in HASH_NEUTRAL_DEFAULTS.items():
            values = resolved.get(section, {})
            if key in values and values[key] == default:
                del values[key]
        payload = json.dumps(resolved, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def validate_config(data: dict[str, Any], source: str = "configuration") -> RunConfig:
    return validate_typed(RunConfig, data, source)


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML run config (or start from defaults when ``path`` is None) and apply overrides."""
    data, source = read_with_overrides(path, overrides)
    return validate_config(data, source)


