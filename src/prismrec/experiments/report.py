"""Turn finished cells into the paper-style report: markdown table, JSON rows, significance, figures.

Values are test-split metrics of the best validation checkpoint, mean +- std (sample std, ddof=1) over
seeds. Statistics are over *users*, the unit the evaluation sampled (:mod:`prismrec.evaluation.statistics`):
each method's per-user metrics are averaged over its seeds first, then

- each row gets a 95% bootstrap interval of its mean over users (``ci95_low``, ``ci95_high``, ``n_users``);
- the proposed method is compared with the best baseline of the same backbone and axis values (best = the
  highest mean over the seeds both have) by a two-sided paired t-test and a Wilcoxon signed-rank test over
  users (``p_value``, ``p_value_wilcoxon``), a 95% bootstrap interval of "proposed minus best baseline"
  (``diff_ci95_low``, ``diff_ci95_high``) and the smallest difference those users could detect
  (``min_detectable_diff``: 80% power at alpha 0.05), all over the per-user means of the shared seeds.

Rows kept from an earlier report (``--keep-rows``) whose cells left no per-user metrics carry no statistics
(their old p-values came from seeds x users pairs and are dropped); the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prismrec.evaluation.statistics import (
    RESAMPLES,
    bootstrap_mean_ci,
    compare_paired,
    seed_averaged,
)
from prismrec.experiments.paper import paper_value
from prismrec.experiments.runner import LONGTAIL_SHARE, CellResult
from prismrec.experiments.selection import Selection, report_results
from prismrec.experiments.spec import Cell, ExperimentSpec

MODES = ("sampled", "full")
SUBSETS = ("all", "longtail")
SHORT = {"hit@10": "H@10", "ndcg@10": "N@10"}


@dataclass
class Row:
    backbone: str
    method: str
    metric: str
    mode: str
    mean: float
    std: float
    paper: float | None
    p_value: float | None = None
    subset: str = "all"
    axes: dict[str, Any] = field(default_factory=dict)
    n_seeds: int = 0
    best_baseline: str | None = None
    # The seeds the paired test used (those the proposed method shares with its best baseline) and both
    # methods' means over just those seeds: with a grid part-way through, the row means above can be over
    # other seeds than the test, and the two-sided test alone does not say which method is ahead.
    test_seeds: list[int] = field(default_factory=list)
    test_mean: float | None = None
    baseline_test_mean: float | None = None
    # Over users (per-user metrics averaged over the row's seeds): the bootstrap interval of the row mean.
    n_users: int | None = None
    ci95_low: float | None = None
    ci95_high: float | None = None
    # The proposed method's rows only: the user-level comparison with the best baseline over the test seeds.
    p_value_wilcoxon: float | None = None
    diff_vs_baseline: float | None = None
    diff_ci95_low: float | None = None
    diff_ci95_high: float | None = None
    min_detectable_diff: float | None = None
    # Sweeps (one method over axis values): the other setting this row is compared with (the best of the others
    # by mean), in place of a best baseline.
    reference_axes: dict[str, Any] | None = None
    # Options chosen on validation for this row (an experiment's [select] axis), e.g. {"loss": "ce"}.
    selected: dict[str, Any] = field(default_factory=dict)

    @property
    def diff(self) -> float | None:
        return None if self.paper is None else self.mean - self.paper

    @property
    def has_user_statistics(self) -> bool:
        return self.n_users is not None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        row = cls(data["backbone"], data["method"], data["metric"], data["mode"], float(data["mean"]),
                  float(data["std"]), data.get("paper"), data.get("p_value"), subset=data.get("subset", "all"),
                  axes=dict(data.get("axes") or {}), n_seeds=int(data.get("n_seeds", 0)),
                  best_baseline=data.get("best_baseline"), test_seeds=[int(s) for s in data.get("test_seeds") or []],
                  test_mean=data.get("test_mean"), baseline_test_mean=data.get("baseline_test_mean"))
        for name in USER_STATISTICS:
            setattr(row, name, data.get(name))
        row.selected = dict(data.get("selected") or {})
        row.reference_axes = data.get("reference_axes")
        if row.n_users is None:
            # A row written before statistics over users: its p-value paired seeds x users, which counts
            # each user once per seed. Drop it rather than show a p-value that is too small.
            row.p_value = None
        return row

    def to_json(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "method": self.method, "metric": self.metric, "mode": self.mode,
                "mean": self.mean, "std": self.std, "paper": self.paper, "p_value": self.p_value,
                "subset": self.subset, "axes": self.axes, "n_seeds": self.n_seeds, "diff": self.diff,
                "best_baseline": self.best_baseline, "test_seeds": self.test_seeds, "test_mean": self.test_mean,
                "baseline_test_mean": self.baseline_test_mean,
                **{name: getattr(self, name) for name in USER_STATISTICS}, "selected": self.selected,
                "reference_axes": self.reference_axes}


USER_STATISTICS = ("n_users", "ci95_low", "ci95_high", "p_value_wilcoxon", "diff_vs_baseline", "diff_ci95_low",
                   "diff_ci95_high", "min_detectable_diff")


def _key_axes(result: CellResult) -> tuple[tuple[str, Any], ...]:
    return result.cell.axis_values


def _per_user_values(result: CellResult, mode: str, metric: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = result.per_user()
    users, values = arrays[f"test/{mode}/users"], arrays[f"test/{mode}/{metric}"]
    if subset == "longtail":
        mask = arrays[f"test/{mode}/longtail"].astype(bool)
        users, values = users[mask], values[mask]
    return users, values


def _has_per_user(result: CellResult, mode: str, metric: str) -> bool:
    return f"test/{mode}/{metric}" in result.per_user()


def _cell_value(result: CellResult, mode: str, metric: str, subset: str) -> float | None:
    if subset == "all":
        value = result.final["metrics"].get(f"test/{mode}", {}).get(metric)
        return None if value is None else float(value)
    if not _has_per_user(result, mode, metric):
        return None
    values = _per_user_values(result, mode, metric, subset)[1]
    return float(values.mean()) if len(values) else float("nan")


def _seed_averaged_users(cells: Sequence[CellResult], seeds: Sequence[int], mode: str, metric: str,
                         subset: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-user metric averaged over ``seeds`` (users sorted); None when a cell has no per-user metrics."""
    by_seed = {c.cell.seed: c for c in cells}
    chosen = [by_seed[s] for s in seeds if s in by_seed]
    if not chosen or not all(_has_per_user(c, mode, metric) for c in chosen):
        return None
    try:
        return seed_averaged([_per_user_values(c, mode, metric, subset) for c in chosen])
    except ValueError as exc:
        raise ValueError(f"{', '.join(str(c.run_dir) for c in chosen)}: {exc}") from None


def _stable_seed(*parts: Any) -> int:
    """A bootstrap seed fixed by the row's coordinates, so a regenerated report prints the same intervals."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def build_rows(spec: ExperimentSpec, results: Sequence[CellResult], dataset: str,
               resamples: int = RESAMPLES) -> list[Row]:
    groups: dict[tuple[str, str, tuple[tuple[str, Any], ...]], list[CellResult]] = defaultdict(list)
    for result in results:
        groups[(result.cell.backbone, result.cell.method, _key_axes(result))].append(result)
    rows: list[Row] = []
    index: dict[tuple[str, str, tuple[tuple[str, Any], ...], str, str, str], Row] = {}
    # Each row's value per seed, kept so the test's seed subset can be averaged without reading cells again.
    by_seed: dict[tuple[str, str, tuple[tuple[str, Any], ...], str, str, str], dict[int, float]] = {}
    for (backbone, method, axes), cells in groups.items():
        for metric in spec.metrics:
            for mode in MODES:
                for subset in SUBSETS:
                    seed_values = {c.cell.seed: v for c in cells
                                   if (v := _cell_value(c, mode, metric, subset)) is not None}
                    values = list(seed_values.values())
                    if not values:
                        continue
                    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                    paper = paper_value(spec.paper_table, dataset, backbone, method, metric) \
                        if mode == "sampled" and subset == "all" and not axes else None
                    row = Row(backbone, method, metric, mode, float(np.mean(values)), std, paper, subset=subset,
                              axes=dict(axes), n_seeds=len(values))
                    users = _seed_averaged_users(cells, sorted(seed_values), mode, metric, subset)
                    if users is not None and len(users[1]):
                        row.n_users = len(users[1])
                        row.ci95_low, row.ci95_high = bootstrap_mean_ci(
                            users[1], resamples, _stable_seed(backbone, method, axes, metric, mode, subset))
                    rows.append(row)
                    index[(backbone, method, axes, metric, mode, subset)] = row
                    by_seed[(backbone, method, axes, metric, mode, subset)] = seed_values
    baselines = _baseline_names(spec)
    for (backbone, method, axes, metric, mode, subset), row in index.items():
        if method != spec.proposed or metric not in spec.test_metrics:
            continue
        ours = by_seed[(backbone, method, axes, metric, mode, subset)]
        best = _strongest(ours, {b: by_seed.get((backbone, b, axes, metric, mode, subset), {}) for b in baselines})
        if best is None:
            continue
        row.best_baseline = best
        _set_test_seeds(row, ours, by_seed[(backbone, best, axes, metric, mode, subset)])
        _compare_users(row, groups[(backbone, method, axes)], groups[(backbone, best, axes)], resamples)
    if not baselines and spec.axes:
        _compare_settings(spec, index, by_seed, groups, resamples)
    return rows


def _compare_settings(spec: ExperimentSpec, index: dict[Any, Row], by_seed: dict[Any, dict[int, float]],
                      groups: dict[Any, list[CellResult]], resamples: int) -> None:
    """A sweep (the proposed method alone over axis values): each setting against the best of the *other*
    settings of the same backbone (highest mean over the seeds both have), over users as for baselines."""
    for (backbone, method, axes, metric, mode, subset), row in index.items():
        if method != spec.proposed or metric not in spec.test_metrics:
            continue
        ours = by_seed[(backbone, method, axes, metric, mode, subset)]
        others = {other: theirs for (b, m, other, me, mo, su), theirs in by_seed.items()
                  if (b, m, me, mo, su) == (backbone, method, metric, mode, subset) and other != axes}
        reference = _strongest(ours, others)
        if reference is None:
            continue
        row.reference_axes = dict(reference)
        _set_test_seeds(row, ours, others[reference])
        _compare_users(row, groups[(backbone, method, axes)], groups[(backbone, method, reference)], resamples)


def _strongest(ours: dict[int, float], others: dict[Any, dict[int, float]]) -> Any | None:
    """The key of ``others`` (a baseline, or another setting of a sweep) with the highest mean over the seeds
    it shares with ``ours``: the seeds the paired test can use (the row mean once the grid is complete)."""
    candidates = []
    for key, theirs in others.items():
        shared = [theirs[seed] for seed in ours if seed in theirs]
        if shared:
            candidates.append((float(np.mean(shared)), str(key), key))
    return max(candidates)[2] if candidates else None


def _set_test_seeds(row: Row, ours: dict[int, float], theirs: dict[int, float]) -> None:
    row.test_seeds = sorted(seed for seed in ours if seed in theirs)
    row.test_mean = float(np.mean([ours[seed] for seed in row.test_seeds]))
    row.baseline_test_mean = float(np.mean([theirs[seed] for seed in row.test_seeds]))


def _compare_users(row: Row, proposed: Sequence[CellResult], baseline: Sequence[CellResult],
                   resamples: int) -> None:
    """Fill ``row``'s user-level comparison with its best baseline over the test seeds (per-user metrics
    averaged over those seeds for both methods, then paired over users)."""
    ours = _seed_averaged_users(proposed, row.test_seeds, row.mode, row.metric, row.subset)
    theirs = _seed_averaged_users(baseline, row.test_seeds, row.mode, row.metric, row.subset)
    if ours is None or theirs is None or not len(ours[1]):
        return
    if not np.array_equal(ours[0], theirs[0]):
        raise ValueError(f"{row.method} and {row.best_baseline or row.reference_axes} ({row.backbone}) scored "
                         "different test users: cannot pair them")
    result = compare_paired(ours[1], theirs[1], resamples,
                            _stable_seed("diff", row.backbone, row.method, row.best_baseline, row.reference_axes,
                                         tuple(sorted(row.axes.items())), row.metric, row.mode, row.subset))
    row.p_value, row.p_value_wilcoxon = result.p_value, result.p_value_wilcoxon
    row.diff_vs_baseline = result.diff
    row.diff_ci95_low, row.diff_ci95_high = result.ci95_low, result.ci95_high
    row.min_detectable_diff = result.min_detectable_diff


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _metric_table(spec: ExperimentSpec, rows: Sequence[Row], subset: str, n_seeds: int = 0) -> list[str]:
    """Markdown rows of the paper's layout for one user subset (``all`` or ``longtail``); a row over fewer
    than ``n_seeds`` seeds (the report's count) says how many it has."""
    table = {(r.backbone, r.method, tuple(sorted(r.axes.items())), r.metric, r.mode): r
             for r in rows if r.subset == subset}
    selected = spec.select.axis if spec.select else None
    axis_names = [a.name for a in spec.axes if a.name != selected]
    lines: list[str] = []
    header = ["Backbone", "Method", *axis_names, *([f"{selected} (chosen)"] if selected else [])]
    for metric in spec.metrics:
        short = SHORT.get(metric, metric)
        header += [f"{short} s100", "paper", "Δ", f"{short} full"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    settings = sorted({(r.backbone, r.method, tuple(sorted(r.axes.items()))) for r in rows},
                      key=lambda s: ([b.name for b in spec.backbones].index(s[0]),
                                     [m.name for m in spec.methods].index(s[1]), s[2]))
    for backbone, method, axes in settings:
        # Values in the header's order (the spec's axes), not the sorted key order the rows are grouped by.
        cells = [spec.backbone_label(backbone), spec.method_label(method),
                 *(str(dict(axes).get(name, "")) for name in axis_names)]
        if selected:
            chosen = {str(r.selected.get(selected, "")) for r in rows
                      if (r.backbone, r.method, tuple(sorted(r.axes.items()))) == (backbone, method, axes)}
            cells.append("/".join(sorted(chosen)))
        for metric in spec.metrics:
            for mode in MODES:
                row = table.get((backbone, method, axes, metric, mode))
                if row is None:
                    cells += ["", "", ""] if mode == "sampled" else [""]
                    continue
                star = "*" if row.p_value is not None and row.p_value < 0.05 else ""
                # One seed has no spread: say so rather than print a std of 0.
                spread = " (1 seed)" if row.n_seeds == 1 else f" ± {row.std:.4f}"
                if 1 < row.n_seeds < n_seeds:
                    spread += f" ({row.n_seeds} seeds)"
                interval = "" if row.ci95_low is None or row.ci95_high is None \
                    else f" [{row.ci95_low:.4f}, {row.ci95_high:.4f}]"
                value = f"{row.mean:.4f}{spread}{interval}{star}"
                cells += [value, _fmt(row.paper), _signed(row.diff)] if mode == "sampled" else [value]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _partial_tests(spec: ExperimentSpec, rows: Sequence[Row], subsets: Sequence[str]) -> list[str]:
    """One line per test run on fewer seeds than the rows it compares (a grid part-way through): the seeds
    it used and both methods' means over them, so the reader sees which way a `*` points. ``subsets``: the
    user subsets the report shows tables for."""
    seeds_of = {(r.backbone, r.method, tuple(sorted(r.axes.items())), r.metric, r.mode, r.subset): r.n_seeds
                for r in rows}
    lines: list[str] = []
    for row in rows:
        if row.best_baseline is None or not row.test_seeds or row.test_mean is None \
                or row.baseline_test_mean is None or row.subset not in subsets:
            continue
        key = (row.backbone, row.best_baseline, tuple(sorted(row.axes.items())), row.metric, row.mode, row.subset)
        if len(row.test_seeds) >= max(row.n_seeds, seeds_of.get(key, 0)):
            continue
        where = ", ".join([spec.backbone_label(row.backbone), *(f"{k}={v}" for k, v in sorted(row.axes.items()))])
        subset = " long tail" if row.subset == "longtail" else ""
        short = SHORT.get(row.metric, row.metric)
        mode = "s100" if row.mode == "sampled" else "full"
        p_value = "" if row.p_value is None else f", p = {row.p_value:.2g}"
        lines.append(f"- {where}, {short} {mode}{subset}: {spec.method_label(row.method)} {row.test_mean:.4f} vs "
                     f"{spec.method_label(row.best_baseline)} {row.baseline_test_mean:.4f} on seed(s) "
                     f"{', '.join(map(str, row.test_seeds))}{p_value}")
    if not lines:
        return []
    return ["", f"Tests on fewer seeds than the rows they compare (only the seeds {spec.proposed} shares with its "
            "best baseline can be paired; the best baseline is the highest over those seeds), with both means over "
            "the tested seeds:", "", *lines]


def _selection_table(spec: ExperimentSpec, selection: Selection) -> list[str]:
    """The validation values behind each choice of the [select] axis."""
    values = [v for a in spec.axes if a.name == selection.axis for v in a.values]
    lines = [f"`{selection.axis}` is chosen per method and backbone on validation, never on test: every value "
             f"trains on seed(s) {', '.join(map(str, selection.seeds))}, the one with the higher "
             f"`{selection.metric}` of its best checkpoint (mean over those seeds; ties: the first listed) is "
             "chosen, and the other seeds train only the chosen value. The rows below are over the chosen cells "
             "of every seed.", "",
             "| Backbone | Method | " + " | ".join(f"{selection.axis}={v}" for v in values) + " | chosen |",
             "|---|---|" + "---|" * len(values) + "---|"]
    order = {b.name: i for i, b in enumerate(spec.backbones)}
    methods = {m.name: i for i, m in enumerate(spec.methods)}
    for (method, backbone, axes), evidence in sorted(selection.evidence.items(),
                                                      key=lambda g: (order.get(g[0][1], 99),
                                                                     methods.get(g[0][0], 99), g[0][2])):
        where = spec.method_label(method) + "".join(f", {k}={v}" for k, v in axes)
        cells = [f"{np.mean(list(evidence[v].values())):.4f}" if evidence.get(v) else "" for v in values]
        chosen = selection.chosen.get((method, backbone, axes))
        lines.append(f"| {spec.backbone_label(backbone)} | {where} | " + " | ".join(cells)
                     + f" | {'' if chosen is None else chosen} |")
    return [*lines, ""]


def _significance_table(spec: ExperimentSpec, rows: Sequence[Row], subsets: Sequence[str]) -> list[str]:
    """One line per comparison of the proposed method with its best baseline: difference over users with its
    bootstrap interval, both p-values, users, and the smallest difference those users could detect."""
    compared = [r for r in rows if r.method == spec.proposed and (r.best_baseline or r.reference_axes)
                and r.diff_vs_baseline is not None and r.subset in subsets]
    if not compared:
        return []
    sweep = any(r.reference_axes for r in compared)
    what = ("Each setting minus the best *other* setting of the same backbone (highest mean)" if sweep else
            f"{spec.proposed} minus the best baseline of the same backbone")
    lines = ["", f"{what}, over test users (per-user metrics "
             "averaged over the seeds both have first). Δ: mean difference with its 95% bootstrap interval "
             f"over users; p: two-sided paired t-test / Wilcoxon signed-rank test over users; MDD: the smallest "
             "true difference these users detect with 80% power at α = 0.05. `*` in the tables above: p (t-test) "
             "< 0.05.", "",
             f"| Backbone | subset | metric | {'compared with' if sweep else 'best baseline'} | seeds | users | "
             "Δ [95% CI] | p (t) | p (Wilcoxon) | MDD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {b.name: i for i, b in enumerate(spec.backbones)}
    missing = _missing_baselines(spec, rows)  # empty for a sweep: it has no baselines
    for row in sorted(compared, key=lambda r: (order.get(r.backbone, 99), SUBSETS.index(r.subset),
                                               tuple(sorted(r.axes.items())), r.metric, MODES.index(r.mode))):
        where = ", ".join([spec.backbone_label(row.backbone), *(f"{k}={v}" for k, v in sorted(row.axes.items()))])
        short = SHORT.get(row.metric, row.metric)
        mode = "s100" if row.mode == "sampled" else "full"
        lines.append(f"| {where} | {'long tail' if row.subset == 'longtail' else 'all'} | {short} {mode} | "
                     f"{_reference(spec, row)}{' (of the finished)' if missing.get(row.backbone) else ''} | "
                     f"{','.join(map(str, row.test_seeds))} | "
                     f"{row.n_users} | {row.diff_vs_baseline:+.4f} [{row.diff_ci95_low:+.4f}, "
                     f"{row.diff_ci95_high:+.4f}] | {_p(row.p_value)} | {_p(row.p_value_wilcoxon)} | "
                     f"{_fmt(row.min_detectable_diff)} |")
    detectable = [r.min_detectable_diff for r in compared if r.min_detectable_diff is not None]
    significant = sum(1 for r in compared if r.p_value is not None and r.p_value < 0.05)
    lines += ["", f"{significant} of {len(compared)} comparisons have p < 0.05 (t-test); the smallest difference "
              f"this report could detect ranges from {min(detectable):.4f} to {max(detectable):.4f} "
              "(same units as the metric)." if detectable else ""]
    for backbone in sorted(missing, key=lambda b: order.get(b, 99)):
        # A grid part-way through: the best of the finished baselines is not the grid's best baseline, and a
        # `*` against it says nothing about the baselines still training.
        lines += ["", f"{spec.backbone_label(backbone)}: the best baseline is the best of the finished ones only; "
                  f"not finished on this backbone: {', '.join(spec.method_label(m) for m in missing[backbone])}."]
    return lines


def _baseline_names(spec: ExperimentSpec) -> list[str]:
    """The methods the proposed one is tested against, in the spec's order (reference rows are not counted)."""
    return [m.name for m in spec.methods if m.baseline and m.name != spec.proposed]


def _missing_baselines(spec: ExperimentSpec, rows: Sequence[Row]) -> dict[str, list[str]]:
    """Per backbone the proposed method has rows for, the spec's baselines with no row there yet."""
    baselines = _baseline_names(spec)
    missing: dict[str, list[str]] = {}
    for backbone in {r.backbone for r in rows if r.method == spec.proposed}:
        present = {r.method for r in rows if r.backbone == backbone}
        if absent := [m for m in baselines if m not in present]:
            missing[backbone] = absent
    return missing


def _reference(spec: ExperimentSpec, row: Row) -> str:
    if row.reference_axes is not None:
        return ", ".join(f"{k}={v}" for k, v in sorted(row.reference_axes.items()))
    return spec.method_label(row.best_baseline or "")


def _p(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def _without_statistics(spec: ExperimentSpec, rows: Sequence[Row]) -> list[str]:
    """Backbones whose rows were kept from a report written before statistics over users."""
    bare = list(dict.fromkeys(spec.backbone_label(r.backbone) for r in rows if not r.has_user_statistics))
    if not bare:
        return []
    return ["", f"Rows of {', '.join(bare)} have no per-user metrics behind them (cells trained before cell records "
            "were kept, rows carried from an earlier report): they have no intervals and no p-values (the earlier "
            "p-values paired seeds x users and are dropped). Rerun those cells with `--records` to get them.", ""]


@dataclass
class CarriedRows:
    """Rows (and cell times) of backbones not rerun, kept from the report an earlier invocation wrote.

    Each backbone's rows, means and p-values come from one invocation's cells: the significance test pairs
    cells of the same backbone only, so rows of different backbones can be put side by side unchanged.
    """

    rows: list[Row]
    cells: list[dict[str, Any]]

    @property
    def backbones(self) -> list[str]:
        return list(dict.fromkeys(r.backbone for r in self.rows))


def cell_records(results: Sequence[CellResult], command: str) -> list[dict[str, Any]]:
    return [{"cell": r.cell.cell_id, "backbone": r.cell.backbone, "method": r.cell.method, "seed": r.cell.seed,
             "seconds": None if math.isnan(r.wall_seconds) else round(r.wall_seconds, 1),
             "run_dir": r.run_dir.name, "command": command} for r in results]


def load_carried_rows(out_dir: Path, name: str, rerun_backbones: Sequence[str]) -> CarriedRows:
    """Rows of ``<name>.json`` in ``out_dir`` for backbones other than ``rerun_backbones`` (and their cell
    times from ``<name>.cells.json``); empty when there is no earlier report."""
    rows_path, cells_path = out_dir / f"{name}.json", out_dir / f"{name}.cells.json"
    if not rows_path.exists():
        return CarriedRows([], [])
    try:
        rows = [Row.from_json(r) for r in json.loads(rows_path.read_text(encoding="utf-8"))]
        cells = json.loads(cells_path.read_text(encoding="utf-8")) if cells_path.exists() else []
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot keep rows from {rows_path}: {exc}") from None
    rerun = set(rerun_backbones)
    return CarriedRows([r for r in rows if r.backbone not in rerun],
                       [c for c in cells if c.get("backbone") not in rerun])


def markdown_table(spec: ExperimentSpec, rows: Sequence[Row], records: Sequence[dict[str, Any]], dataset: str,
                   command: str, carried: CarriedRows | None = None, missing: Sequence[Cell] = (),
                   selection: Selection | None = None) -> str:
    """The paper's layout: backbone / method rows; per metric ours (sampled-100), paper, difference, ours (full).

    ``records``: every cell behind ``rows`` (carried ones first), as :func:`cell_records` describes them.
    ``missing``: cells of the grid not finished yet (``--finished-only``), listed under the tables.
    """
    seeds = sorted({int(r["seed"]) for r in records})
    lines = [f"# {spec.title or spec.name} ({dataset})", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += ["Command:", "", "```bash", command, "```", ""]
    if carried and carried.rows:
        earlier = list(dict.fromkeys(c["command"] for c in carried.cells if c.get("command")))
        shown = ", ".join(spec.backbone_label(n) for n in carried.backbones)
        lines += [f"Rows of {shown} kept from an earlier invocation of this report (not rerun here; each "
                  "backbone's rows and p-values come from one invocation's cells):", "", "```bash", *earlier,
                  "```", ""]
    lines += [
              f"Test split, best validation checkpoint, mean ± std over seeds {', '.join(map(str, seeds))} "
              "(a row run on fewer seeds says so; `n_seeds` in the JSON rows). "
              "s100: the paper's protocol (positive + 100 sampled negatives); full: ranked against every item. "
              "paper: the published value (sampled protocol), Δ = ours − paper. "
              "[low, high]: 95% bootstrap interval of the mean over test users (per-user metrics averaged over the "
              f"row's seeds, {RESAMPLES} resamples). "
              f"`*`: {spec.proposed} differs from the best baseline of the same backbone (two-sided paired t-test "
              "over users, p < 0.05; details below and in the JSON rows).", ""]
    if selection is not None:
        lines += _selection_table(spec, selection)
    lines += _metric_table(spec, rows, "all", len(seeds))
    subsets = ["all"]
    if "longtail" in spec.figures:
        subsets.append("longtail")
        lines += ["", f"Long-tail users only (test target among the {LONGTAIL_SHARE:.0%} least popular items by "
                  "training interactions, paper Figure 2); the paper publishes no numbers for them, so its "
                  "columns are empty:", ""]
        lines += _metric_table(spec, rows, "longtail", len(seeds))
    lines += _significance_table(spec, rows, subsets)
    lines += _without_statistics(spec, rows)
    lines += _partial_tests(spec, rows, subsets)
    if missing:
        lines += ["", f"Not finished yet: {len(missing)} cell(s) of this grid are left out of the rows above (report "
                  "written with `--finished-only`; rerun without it to train them)"
                  + (f"; a cell named without `{selection.axis}` trains with the value its method's selection "
                     "cells choose" if selection is not None else "") + ":", "",
                  ", ".join(c.cell_id for c in missing)]
    borrowed = any(not str(r["run_dir"]).startswith(f"{r['cell']}-") for r in records)
    lines += ["", "Wall-clock time per cell (training + evaluation; cells reused from earlier invocations keep the "
              "time recorded when they ran" + ("; a run directory named after another cell holds a cell of equal "
                                               "settings, another experiment's, reused" if borrowed else "")
              + "):", "", "| cell | seconds | run directory |", "|---|---|---|"]
    for record in records:
        seconds = record.get("seconds")
        lines.append(f"| {record['cell']} | {'' if seconds is None else f'{seconds:.1f}'} | `{record['run_dir']}` |")
    total = sum(float(r["seconds"]) for r in records if r.get("seconds") is not None)
    lines += ["", f"Total: {total:.1f} s over {len(records)} cells.", ""]
    return "\n".join(lines)


def write_figures(spec: ExperimentSpec, rows: Sequence[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    if "sweep" in spec.figures:
        for axis in spec.axes:
            fig, panels = plt.subplots(1, len(MODES), figsize=(5 * len(MODES), 3.6), squeeze=False)
            for panel, mode in zip(panels[0], MODES, strict=True):
                series: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
                for row in rows:
                    if row.mode == mode and row.subset == "all" and axis.name in row.axes:
                        series[(row.backbone, row.method, row.metric)].append(row)
                for (backbone, method, metric), points in sorted(series.items()):
                    points.sort(key=lambda r: axis.values.index(r.axes[axis.name]))
                    xs = list(range(len(points)))
                    name = f"{spec.method_label(method)}/{backbone} {SHORT.get(metric, metric)}"
                    panel.errorbar(xs, [p.mean for p in points], yerr=[p.std for p in points], marker="o",
                                   capsize=3, label=name)
                    panel.set_xticks(xs, [str(p.axes[axis.name]) for p in points])
                panel.set_xlabel(axis.name)
                panel.set_title(f"test, {mode} ranking")
                panel.grid(alpha=0.3)
                panel.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{axis.name}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    # The long-tail chart is `longtail.png` for the longtail experiment itself and `<experiment>.longtail.png` for
    # any other, so experiments sharing one --out folder (reports/movielens) never overwrite each other's figure.
    longtail_name = "longtail.png" if spec.name == "longtail" else f"{spec.name}.longtail.png"
    for kind, subset, filename in (("longtail", "longtail", longtail_name), ("methods", "all", f"{spec.name}.png")):
        if kind not in spec.figures:
            continue
        chosen = [r for r in rows if r.subset == subset and r.mode == "sampled" and not r.axes]
        backbones = [b.name for b in spec.backbones if any(r.backbone == b.name for r in chosen)]
        methods = [m.name for m in spec.methods if any(r.method == m.name for r in chosen)]
        fig, panels = plt.subplots(1, len(spec.metrics), figsize=(5 * len(spec.metrics), 3.6), squeeze=False)
        width = 0.8 / max(1, len(methods))
        for panel, metric in zip(panels[0], spec.metrics, strict=True):
            for m, method in enumerate(methods):
                found = {r.backbone: r for r in chosen if r.method == method and r.metric == metric}
                xs = [b + m * width for b in range(len(backbones))]
                panel.bar(xs, [found[b].mean if b in found else 0.0 for b in backbones], width,
                          yerr=[found[b].std if b in found else 0.0 for b in backbones], capsize=2,
                          label=spec.method_label(method))
            panel.set_xticks([b + 0.4 - width / 2 for b in range(len(backbones))],
                             [spec.backbone_label(b) for b in backbones])
            users = "long-tail users" if subset == "longtail" else "all users"
            panel.set_title(f"{SHORT.get(metric, metric)} (s100, {users})")
            panel.grid(axis="y", alpha=0.3)
            panel.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(spec: ExperimentSpec, results: Sequence[CellResult], dataset: str, out_dir: Path,
                 command: str, carried: CarriedRows | None = None, missing: Sequence[Cell] = (),
                 selection: Selection | None = None) -> dict[str, Any]:
    """Write ``<name>.md``, ``<name>.json`` (the rows), ``<name>.cells.json`` (cell times and run
    directories) and the figures into ``out_dir``; ``carried`` rows (other backbones) are kept beside the new,
    ``missing`` cells (not finished, ``--finished-only``) are named in the markdown."""
    if not results and not (carried and carried.rows):
        raise ValueError(f"no finished cells to report for {spec.name}"
                         + (f" ({len(missing)} not finished)" if missing else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    row_results = results if selection is None else report_results(results, selection)
    new_rows = build_rows(spec, row_results, dataset)
    if selection is not None:
        by_group = {(m, b, tuple(sorted(a))): v for (m, b, a), v in selection.chosen.items()}
        for row in new_rows:
            chosen = by_group.get((row.method, row.backbone, tuple(sorted(row.axes.items()))))
            if chosen is not None:
                row.selected = {selection.axis: chosen}
    rows = [*(carried.rows if carried else []), *new_rows]
    # Every cell trained counts in the time table, the selection cells of the values not chosen included.
    records = [*(carried.cells if carried else []), *cell_records(results, command)]
    table_path = out_dir / f"{spec.name}.md"
    table_path.write_text(markdown_table(spec, rows, records, dataset, command, carried, missing, selection),
                          encoding="utf-8")
    if selection is not None:
        (out_dir / f"{spec.name}.selection.json").write_text(
            json.dumps(selection.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    json_path = out_dir / f"{spec.name}.json"
    json_path.write_text(json.dumps([r.to_json() for r in rows], indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / f"{spec.name}.cells.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    figures = write_figures(spec, rows, out_dir)
    return {"table": table_path, "json": json_path, "figures": figures, "rows": rows}
