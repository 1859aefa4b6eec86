"""Experiment files: a TOML description of a grid of runs (methods x backbones x extra axes x seeds).

A *method* is a base run config plus overrides (``{backbone}`` and ``{dataset}`` in its config path and
overrides are filled in per cell), a *backbone* adds its own overrides, an *axis* sweeps one config key
(``model.alpha``, ``model.hidden_size``) over values. Every cell resolves to an ordinary
:class:`~prismrec.config.RunConfig`, so a cell is a normal run directory.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prismrec.config import RunConfig, load_config
from prismrec.options import ConfigError, read_toml, validate_typed

FigureKind = Literal["sweep", "longtail", "methods"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodSpec(_Strict):
    name: str = Field(..., pattern=_NAME, description="row label, e.g. None, CPMM, DMESR, w/o-CL")
    label: str | None = Field(None, description="how the report prints it (default: name)")
    config: str = Field(..., description="base run config, relative to the experiment file's config_root; "
                                          "may contain {backbone} and {dataset}")
    overrides: list[str] = Field(default_factory=list, description="section.key=value, {backbone}/{dataset} filled")
    baseline: bool = Field(True, description="counted when picking the best baseline for the t-test")

    @property
    def shown(self) -> str:
        return self.label or self.name


class BackboneSpec(_Strict):
    name: str = Field(..., pattern=_NAME)
    label: str | None = None
    overrides: list[str] = Field(default_factory=list, description="applied to every method on this backbone")

    @property
    def shown(self) -> str:
        return self.label or self.name


class AxisSpec(_Strict):
    name: str = Field(..., pattern=_NAME, description="short name used in cell ids and figures, e.g. alpha")
    key: str = Field(..., description="dotted config key swept, e.g. model.alpha")
    values: list[float | int | str | bool] = Field(..., min_length=1)


class SelectSpec(_Strict):
    """An axis whose value is chosen on validation per method and backbone (:mod:`.selection`)."""

    axis: str = Field(..., description="name of one of the experiment's axes, e.g. loss")
    metric: str = Field("valid/sampled/ndcg@10", pattern=r"^valid/(sampled|full)/[a-z]+(@[0-9]+)?$",
                        description="validation metric of the best checkpoint that decides (higher is better)")
    seeds: list[int] | None = Field(None, min_length=1, description="seeds that train every value "
                                    "(default: the first seed run); the other seeds train only the chosen one")


class ExperimentSpec(_Strict):
    name: str = Field(..., pattern=_NAME)
    title: str = ""
    description: str = ""
    config_root: Path = Field(Path("../"), description="folder of the methods' base configs, relative to this file")
    seeds: list[int] = Field(default_factory=lambda: [42, 43, 44], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="applied to every cell (after the method's)")
    proposed: str = Field(..., description="the method tested against the best baseline")
    paper_table: str | None = Field(None, description="key of the published numbers (prismrec.experiments.paper)")
    metrics: list[str] = Field(default_factory=lambda: ["hit@10", "ndcg@10"], min_length=1)
    test_metrics: list[str] = Field(default_factory=lambda: ["hit@10", "ndcg@10"],
                                    description="metrics of the paired t-test (per-user, test split)")
    figures: list[FigureKind] = Field(default_factory=list)
    methods: list[MethodSpec] = Field(..., min_length=1)
    backbones: list[BackboneSpec] = Field(..., min_length=1)
    axes: list[AxisSpec] = Field(default_factory=list)
    select: SelectSpec | None = Field(None, description="an axis chosen on validation instead of reported")

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        for kind, names in (("method", [m.name for m in self.methods]), ("backbone", [b.name for b in self.backbones]),
                            ("axis", [a.name for a in self.axes])):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {kind} name(s): {', '.join(duplicates)}")
        if self.select is not None and self.select.axis not in {a.name for a in self.axes}:
            raise ValueError(f"select.axis = {self.select.axis!r} is not one of the axes "
                             f"({', '.join(a.name for a in self.axes) or 'none'})")
        if self.proposed not in {m.name for m in self.methods}:
            raise ValueError(f"proposed = {self.proposed!r} is not one of the methods "
                             f"({', '.join(m.name for m in self.methods)})")
        return self

    def method_label(self, name: str) -> str:
        """How reports print the method ``name`` (its label; the name itself if the spec has no such method)."""
        return next((m.shown for m in self.methods if m.name == name), name)

    def backbone_label(self, name: str) -> str:
        """How reports print the backbone ``name`` (its label; the name itself if the spec has no such backbone)."""
        return next((b.shown for b in self.backbones if b.name == name), name)


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    backbone: str
    seed: int
    axis_values: tuple[tuple[str, Any], ...]
    config: RunConfig

    @property
    def setting(self) -> str:
        """The cell id without the seed (cells differing only by seed are averaged)."""
        parts = [self.method, self.backbone] + [f"{name}{value}" for name, value in self.axis_values]
        return "-".join(re.sub(r"[^A-Za-z0-9_.+-]", "_", str(p)) for p in parts)

    @property
    def cell_id(self) -> str:
        return f"{self.setting}-s{self.seed}"


def load_experiment(path: Path | str) -> ExperimentSpec:
    path = Path(path)
    data = read_toml(path, "experiment")
    spec = validate_typed(ExperimentSpec, data, str(path))
    if not spec.config_root.is_absolute():
        spec.config_root = (path.parent / spec.config_root).resolve()
    return spec


def _restrict(spec: ExperimentSpec, field: Literal["backbones", "methods"],
              names: Sequence[str] | None) -> ExperimentSpec:
    """``spec`` with only the named entries of ``field``, in the experiment's order; unknown names are an error."""
    if not names:
        return spec
    entries = getattr(spec, field)
    known = [entry.name for entry in entries]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"experiment {spec.name}: unknown {field[:-1]}(s) {', '.join(unknown)}; "
                          f"it has {', '.join(known)}")
    return spec.model_copy(update={field: [entry for entry in entries if entry.name in names]})


def restrict_backbones(spec: ExperimentSpec, backbones: Sequence[str] | None) -> ExperimentSpec:
    """The experiment on a subset of its backbones (``--backbones``), e.g. to run a grid one backbone at a time.

    Cells keep their config hashes, so a later run over all backbones reuses the finished ones.
    """
    return _restrict(spec, "backbones", backbones)


def restrict_methods(spec: ExperimentSpec, methods: Sequence[str] | None) -> ExperimentSpec:
    """The experiment on a subset of its methods (``--methods``), e.g. the proposed method and the plain backbone
    first when a sitting cannot hold the whole grid.

    Cells keep their config hashes, so a later run over all methods reuses the finished ones. The report of a
    restricted run has only these methods' rows, and the significance test compares the proposed method with
    the best baseline *among them*.
    """
    return _restrict(spec, "methods", methods)


def _fill(text: str, backbone: str, dataset: str) -> str:
    return text.replace("{backbone}", backbone).replace("{dataset}", dataset)


def expand_cells(spec: ExperimentSpec, dataset: str, seeds: Sequence[int] | None = None,
                 extra_overrides: Sequence[str] = ()) -> list[Cell]:
    """Resolve every cell's run config (validated now, so a bad grid fails before anything trains).

    Override order: method, backbone, experiment, axis value, dataset/seed/name, then ``extra_overrides``
    (the command line's ``--set``), the last one winning.
    """
    cells: list[Cell] = []
    axis_grid = list(itertools.product(*[[(a.name, a.key, v) for v in a.values] for a in spec.axes]))
    for method in spec.methods:
        for backbone in spec.backbones:
            config_path = spec.config_root / _fill(method.config, backbone.name, dataset)
            for combo in axis_grid:
                for seed in (seeds or spec.seeds):
                    axis_overrides = [f"{key}={_toml_literal(value)}" for _, key, value in combo]
                    # No experiment name in the run name: experiments sharing a cell (table2 and longtail) share
                    # its config hash, hence its run directory.
                    cell_name = "-".join([method.name, backbone.name]
                                         + [f"{n}{v}" for n, _, v in combo] + [f"s{seed}"])
                    overrides = ([_fill(o, backbone.name, dataset) for o in method.overrides]
                                 + [_fill(o, backbone.name, dataset) for o in backbone.overrides]
                                 + [_fill(o, backbone.name, dataset) for o in spec.overrides]
                                 + axis_overrides
                                 + [f"data.dataset={_toml_literal(dataset)}", f"seed={seed}",
                                    f"name={_toml_literal(re.sub(r'[^A-Za-z0-9_.+-]', '_', cell_name))}"]
                                 + list(extra_overrides))
                    try:
                        config = load_config(config_path, overrides)
                    except ConfigError as exc:
                        raise ConfigError(f"experiment {spec.name}, method {method.name}, backbone "
                                          f"{backbone.name}: {exc}") from None
                    cells.append(Cell(method.name, backbone.name, seed,
                                      tuple((name, value) for name, _, value in combo), config))
    return cells


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
