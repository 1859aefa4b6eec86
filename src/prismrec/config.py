"""Typed run configuration: pydantic models, loaded from TOML, with ``--set a.b=value`` overrides.

Every section forbids unknown keys, so a typo (``training.lrr``) is an error naming the key instead of a
silently ignored option. The ``model`` section is validated by the config class of the model it names
(looked up in the model registry), so each model owns its options.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    dataset: str = Field("movielens-small", description="registered dataset name")
    data_dir: Path | None = Field(None, description="folder holding one sub-folder per dataset")
    folder: str | None = Field(None, description="sub-folder of data_dir (default: the loader's own)")
    min_user_interactions: int = Field(1, ge=1)
    min_item_interactions: int = Field(1, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (validated by the loader)")


class ModelConfig(StrictModel):
    """Base of every model's options; ``name`` selects the model in the registry."""

    name: str


class TrainingConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(300, ge=0)
    patience: int = Field(20, ge=1, description="epochs without validation improvement before stopping")
    early_stopping_metric: str = Field("ndcg@10", description="validation metric (sampled mode) to maximise")
    loss: Literal["bce", "ce"] = Field("bce", description="bce: one sampled negative per position (Eq. 7); "
                                       "ce: softmax cross-entropy over all items")
    eval_every: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch default)")
    device: str = Field("cpu")
    window: Literal["last", "sliding"] = Field("last", description="last: train on each user's most recent "
                                               "max_len items (SASRec's recipe); sliding: cut the whole history "
                                               "into max_len windows so every training interaction is a target")


# Options added after runs were already recorded: at their default they are left out of the config hash, so
# finished runs (and experiment cells) stay reusable when the option appears. Set to anything else, they count.
HASH_NEUTRAL_DEFAULTS: dict[tuple[str, str], Any] = {("training", "window"): "last"}


class EvaluationConfig(StrictModel):
    num_negatives: int = Field(100, ge=1)
    negative_seed: int = Field(42, description="seed of the sampled candidates, shared by every model")
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    batch_size: int = Field(256, ge=1)
    full_ranking: bool = True

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
        from prismrec.models import MODELS  # late import: models import this module

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
            if resolved.get(section, {}).get(key, None) == default:
                del resolved[section][key]
        payload = json.dumps(resolved, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.lr=0.0005"`` -> ``(["training", "lr"], 0.0005)``; values are TOML literals, else strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for override in overrides:
        parts, value = parse_override(override)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown option (check the spelling; see the documented options of this section)"
        given = error.get("input")
        hidden = error["type"] in ("extra_forbidden", "missing") or isinstance(given, dict)
        shown = "" if hidden else f" (got {given!r})"
        lines.append(f"  {loc or '(top level)'}: {message}{shown}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "configuration") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except KeyError as exc:  # unknown registry name
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


def read_toml(path: Path | str, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file, turning a missing file or a syntax error into a :class:`ConfigError`."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def command_line_overrides(overrides: Sequence[str] | None, data_dir: Path | None = None) -> list[str]:
    """A command's ``--set`` overrides, plus ``--data-dir`` as the ``data.data_dir`` override (applied last)."""
    combined = list(overrides or [])
    if data_dir is not None:
        combined.append(f"data.data_dir={json.dumps(str(data_dir))}")
    return combined


def read_with_overrides(path: Path | str | None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """A TOML file (or nothing) with ``section.key=value`` overrides applied, and where it came from."""
    data = read_toml(path) if path is not None else {}
    return apply_overrides(data, overrides), str(path) if path is not None else "command-line overrides"


ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def load_typed_config(model: type[ConfigModel], path: Path | str | None,
                      overrides: Sequence[str] = ()) -> ConfigModel:
    """Any pydantic config model (MLLM-MSR, Speeder, ...) from TOML + overrides; errors name file and key."""
    data, source = read_with_overrides(path, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except KeyError as exc:  # unknown registry name
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML run config (or start from defaults when ``path`` is None) and apply overrides."""
    data, source = read_with_overrides(path, overrides)
    return validate_config(data, source)


def dump_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for resolved configs (tables of scalars, lists and nested tables)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return json.dumps(str(value))

    out: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        simple = {k: v for k, v in node.items() if not isinstance(v, dict) and v is not None}
        nested = {k: v for k, v in node.items() if isinstance(v, dict)}
        if prefix:
            out.append(f"\n[{prefix}]")
        for key, value in simple.items():
            out.append(f"{key} = {scalar(value)}")
        for key, value in nested.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(out).lstrip() + "\n"
