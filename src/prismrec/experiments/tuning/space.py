"""The search-space file of ``prismrec tune``: which run-config options a study tunes, over what, and how.

```toml
[study]
metric = "ndcg@10"        # a validation metric of the Trainer (hit@K, ndcg@K, mrr@K, mrr)
mode = "sampled"          # sampled (the paper's 100 negatives) or full ranking; never the test split
trials = 30               # finished trials the study aims at (--trials overrides it)
seeds = [42]              # one run per seed per trial; the objective is their mean
overrides = ["training.max_epochs=100"]   # fixed for every trial

[sampler]
kind = "tpe"              # tpe | random | grid
seed = 0

[pruner]
kind = "median"           # median | hyperband | none
warmup_epochs = 5

[params."training.lr"]    # any option of the run config, as a dotted key
type = "float"            # float | int | categorical
low = 1e-4
high = 1e-2
log = true
```

Every key is checked against the run configuration before anything trains: an option the run config does not
have, a value it would refuse, an empty range or empty choices are :class:`~prismrec.options.ConfigError`\\ s
naming the key. ``name``, ``seed``, ``data.*`` and ``evaluation.*`` cannot be tuned (they define the runs'
identity, the data and the objective itself).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from prismrec.config import RunConfig, load_config
from prismrec.options import ConfigError, StrictModel, config_errors, read_toml, validate_typed

if TYPE_CHECKING:
    import optuna

Choice = bool | int | float | str
FROZEN_KEYS = ("name", "seed")
FROZEN_SECTIONS = ("data.", "evaluation.")


def toml_literal(value: Choice) -> str:
    """A parameter value as the right-hand side of a ``--set`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


class FloatParam(StrictModel):
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = Field(False, description="sample on a log scale (low must be > 0)")
    step: float | None = Field(None, gt=0, description="discretise the range (needed by the grid sampler)")

    def check(self, key: str) -> None:
        if not self.low < self.high:
            raise ConfigError(f"{key}: empty range: low ({self.low}) must be below high ({self.high}); "
                              f"fix a single value with [study] overrides instead")
        if self.log and self.low <= 0:
            raise ConfigError(f"{key}: a log-scale range needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ConfigError(f"{key}: step and log cannot be combined")

    def suggest(self, trial: optuna.Trial, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)

    def grid(self, key: str) -> list[Choice]:
        if self.step is None:
            raise ConfigError(f"{key}: the grid sampler needs choices, or a step for a float range")
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def probes(self) -> list[Choice]:
        return [self.low, self.high]


class IntParam(StrictModel):
    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    def check(self, key: str) -> None:
        if not self.low < self.high:
            raise ConfigError(f"{key}: empty range: low ({self.low}) must be below high ({self.high}); "
                              f"fix a single value with [study] overrides instead")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ConfigError(f"{key}: a log-scale int range needs low > 0 and step 1")

    def suggest(self, trial: optuna.Trial, key: str) -> int:
        return trial.suggest_int(key, self.low, self.high, step=self.step, log=self.log)

    def grid(self, key: str) -> list[Choice]:
        return list(range(self.low, self.high + 1, self.step))

    def probes(self) -> list[Choice]:
        return [self.low, self.high]


class CategoricalParam(StrictModel):
    type: Literal["categorical"] = "categorical"
    choices: list[Choice]

    def check(self, key: str) -> None:
        if not self.choices:
            raise ConfigError(f"{key}: empty range: choices is an empty list")
        if len({json.dumps(c) for c in self.choices}) != len(self.choices):
            raise ConfigError(f"{key}: choices repeat a value: {self.choices}")

    def suggest(self, trial: optuna.Trial, key: str) -> Choice:
        return trial.suggest_categorical(key, self.choices)  # type: ignore[arg-type]

    def grid(self, key: str) -> list[Choice]:
        return list(self.choices)

    def probes(self) -> list[Choice]:
        return list(self.choices)


Param = FloatParam | IntParam | CategoricalParam
PARAM_KINDS: dict[str, type[FloatParam] | type[IntParam] | type[CategoricalParam]] = {
    "float": FloatParam, "int": IntParam, "categorical": CategoricalParam}


class StudySection(StrictModel):
    metric: str = Field("ndcg@10", description="validation metric maximised (hit@K, ndcg@K, mrr@K, mrr)")
    mode: Literal["sampled", "full"] = Field("sampled", description="which evaluator's validation metric")
    trials: int | None = Field(None, ge=1, description="finished trials to reach (default for grid: its size)")
    seeds: list[int] | None = Field(None, min_length=1, description="runs per trial, averaged "
                                    "(default: the run config's seed)")
    overrides: list[str] = Field(default_factory=list, description="section.key=value fixed for every trial")


class TPESamplerConfig(StrictModel):
    kind: Literal["tpe"] = "tpe"
    seed: int = 0
    startup_trials: int = Field(10, ge=1, description="random trials before TPE models the results")
    multivariate: bool = True

    def build(self, params: dict[str, Param], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        # constant_liar: a trial running in another worker counts as a bad result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials,
                                          multivariate=self.multivariate, constant_liar=True)


class RandomSamplerConfig(StrictModel):
    kind: Literal["random"] = "random"
    seed: int = 0

    def build(self, params: dict[str, Param], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)


class GridSamplerConfig(StrictModel):
    kind: Literal["grid"] = "grid"
    seed: int = 0

    def build(self, params: dict[str, Param], seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.GridSampler(grid_space(params), seed=seed)


class MedianPrunerConfig(StrictModel):
    kind: Literal["median"] = "median"
    startup_trials: int = Field(5, ge=0, description="trials finished before any is pruned")
    warmup_epochs: int = Field(5, ge=0, description="epochs of a trial before it can be pruned")
    interval_epochs: int = Field(1, ge=1)

    def build(self, max_epochs: int) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_epochs,
                                           interval_steps=self.interval_epochs)


class HyperbandPrunerConfig(StrictModel):
    kind: Literal["hyperband"] = "hyperband"
    min_epochs: int = Field(1, ge=1, description="epochs every trial gets")
    max_epochs: int | None = Field(None, ge=1, description="default: training.max_epochs")
    reduction_factor: int = Field(3, ge=2)

    def build(self, max_epochs: int) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.HyperbandPruner(min_resource=self.min_epochs, max_resource=self.max_epochs or max_epochs,
                                              reduction_factor=self.reduction_factor)


class NoPrunerConfig(StrictModel):
    kind: Literal["none"] = "none"

    def build(self, max_epochs: int) -> optuna.pruners.BasePruner:
        import optuna

        return optuna.pruners.NopPruner()


SamplerConfig = Annotated[TPESamplerConfig | RandomSamplerConfig | GridSamplerConfig, Field(discriminator="kind")]
PrunerConfig = Annotated[MedianPrunerConfig | HyperbandPrunerConfig | NoPrunerConfig, Field(discriminator="kind")]


class SpaceSettings(StrictModel):
    """Everything in a space file but its ``[params]`` (validated key by key, see :func:`load_space`)."""

    study: StudySection = Field(default_factory=StudySection)
    sampler: SamplerConfig = Field(default_factory=TPESamplerConfig)
    pruner: PrunerConfig = Field(default_factory=MedianPrunerConfig)


def grid_space(params: dict[str, Param]) -> dict[str, list[Choice]]:
    return {key: spec.grid(key) for key, spec in params.items()}


def _flatten_params(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``[params."training.lr"]`` and ``[params.training.lr]`` both name ``training.lr``."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        nested = isinstance(value, dict) and bool(value) and "type" not in value
        if nested and all(isinstance(v, dict) for v in value.values()):
            out.update(_flatten_params(value, name))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class TuneSpace:
    """A validated space file, checked against one run configuration."""

    path: Path
    settings: SpaceSettings
    params: dict[str, Param]
    base_config: Path | None
    base_overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    trials: int | None

    @property
    def study(self) -> StudySection:
        return self.settings.study

    @property
    def grid_size(self) -> int | None:
        if not isinstance(self.settings.sampler, GridSamplerConfig):
            return None
        return math.prod(len(values) for values in grid_space(self.params).values())

    def overrides_for(self, params: dict[str, Any]) -> list[str]:
        """Base overrides, the study's fixed overrides, then the trial's parameters."""
        return [*self.base_overrides, *self.study.overrides,
                *(f"{key}={toml_literal(value)}" for key, value in params.items())]

    def config_for(self, params: dict[str, Any], seed: int, name: str | None = None) -> RunConfig:
        extra = [f"seed={seed}"] + ([f"name={json.dumps(name)}"] if name else [])
        return load_config(self.base_config, [*self.overrides_for(params), *extra])

    def base(self) -> RunConfig:
        """The run config every trial starts from (study overrides applied, no parameter set)."""
        return load_config(self.base_config, [*self.base_overrides, *self.study.overrides])

    def fingerprint(self) -> dict[str, Any]:
        """What a study's trials must share to be compared: recorded in the study, checked when it reopens."""
        space = {"settings": self.settings.model_dump(mode="json", exclude={"study": {"trials"}}),
                 "params": {k: v.model_dump(mode="json") for k, v in sorted(self.params.items())}}
        resolved = self.base().to_dict()
        del resolved["name"]
        resolved["data"].pop("data_dir", None)  # machines sharing a study may keep the data in other places
        return {"base_settings_hash": hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode())
                .hexdigest()[:16],
                "space_hash": hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()[:16],
                "metric": self.study.metric, "mode": self.study.mode, "seeds": list(self.seeds)}


def metric_names(ks: Sequence[int]) -> list[str]:
    return [f"{name}@{k}" for k in ks for name in ("hit", "ndcg", "mrr")] + ["mrr"]


def load_space(path: Path | str, config: Path | str | None, overrides: Sequence[str] = (),
               trials: int | None = None) -> TuneSpace:
    """Read a space file and check every key of it against the run config ``config`` (+ ``overrides``)."""
    path = Path(path)
    raw = read_toml(path, "space")
    raw_params = raw.pop("params", None)
    settings = validate_typed(SpaceSettings, raw, str(path))
    if not isinstance(raw_params, dict) or not raw_params:
        raise ConfigError(f"{path}: [params] is missing or empty: name at least one option to tune, e.g. "
                          f'[params."training.lr"] type = "float", low = 1e-4, high = 1e-2, log = true')
    params: dict[str, Param] = {}
    for key, entry in _flatten_params(raw_params).items():
        where = f'{path} [params."{key}"]'
        if not isinstance(entry, dict) or entry.get("type") not in PARAM_KINDS:
            raise ConfigError(f"{where}: needs type = one of {', '.join(PARAM_KINDS)} "
                              f"(got {entry.get('type') if isinstance(entry, dict) else entry!r})")
        with config_errors(where):
            spec = PARAM_KINDS[entry["type"]].model_validate(entry)
        try:
            spec.check(key)
        except ConfigError as exc:
            raise ConfigError(f"{path}: params.{exc}") from None
        params[key] = spec
    base_overrides = tuple(overrides)
    with _named(f"{path} [study] overrides"):
        base = load_config(config, [*base_overrides, *settings.study.overrides])
    for key, spec in params.items():
        _check_key(path, key)
        for value in spec.probes():
            with _named(f'{path} [params."{key}"] = {value!r}'):
                load_config(config, [*base_overrides, *settings.study.overrides, f"{key}={toml_literal(value)}"])
    study = settings.study
    known = metric_names(base.evaluation.ks)
    if study.metric not in known:
        raise ConfigError(f"{path}: study.metric: unknown validation metric {study.metric!r}; with evaluation.ks = "
                          f"{base.evaluation.ks} it is one of {', '.join(known)}")
    if study.mode == "full" and not base.evaluation.full_ranking:
        raise ConfigError(f"{path}: study.mode: 'full' needs evaluation.full_ranking = true in the run config")
    seeds = tuple(study.seeds or [base.seed])
    space = TuneSpace(path, settings, params, Path(config) if config is not None else None, base_overrides, seeds,
                      trials or study.trials)
    if isinstance(settings.sampler, GridSamplerConfig):
        try:
            size = space.grid_size
        except ConfigError as exc:
            raise ConfigError(f"{path}: params.{exc}") from None
        assert size is not None
        if space.trials is None:
            space = TuneSpace(path, settings, params, space.base_config, base_overrides, seeds, size)
        elif space.trials > size:
            raise ConfigError(f"{path}: study.trials: {space.trials} trials but the grid has {size} points "
                              f"(a grid point is run once)")
    if space.trials is None:
        raise ConfigError(f"{path}: study.trials: how many trials? set trials in [study] or pass --trials")
    return space


def _check_key(path: Path, key: str) -> None:
    if key in FROZEN_KEYS or key.startswith(FROZEN_SECTIONS):
        raise ConfigError(f'{path}: params."{key}": cannot be tuned (name and seed identify the runs, study.seeds '
                          f"sets the seeds; data.* and evaluation.* define the data and the objective)")


class _named:
    """Prefix a ConfigError raised inside with where it came from in the space file."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{self.where}: {exc}") from None
