"""Turn finished cells into the paper-style report: markdown table, JSON rows, significance, figures.

Values are test-split metrics of the best validation checkpoint, mean +- std (sample std, ddof=1) over
seeds. The significance test is a two-sided paired t-test (:func:`scipy.stats.ttest_rel`) of the proposed
method against the best baseline of the same backbone and axis values (best = highest mean on that
metric and mode), over per-user test metrics of the seeds both have, concatenated seed after seed.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from prismrec.experiments.paper import paper_value
from prismrec.experiments.runner import LONGTAIL_SHARE, CellResult
from prismrec.experiments.spec import Cell, ExperimentSpec

MODES = ("sampled", "full")
SUBSETS = ("all", "longtail")
SHORT = {"hit@10": "H@10", "ndcg@10": "N@10"}


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p-value; 1.0 when the pairs do not differ at all (no evidence)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must align: {a.shape} vs {b.shape}")
    diff = a - b
    if len(diff) < 2 or np.allclose(diff, diff[0]):
        return 1.0 if np.allclose(diff, 0.0) else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


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

    @property
    def diff(self) -> float | None:
        return None if self.paper is None else self.mean - self.paper

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        return cls(data["backbone"], data["method"], data["metric"], data["mode"], float(data["mean"]),
                   float(data["std"]), data.get("paper"), data.get("p_value"), subset=data.get("subset", "all"),
                   axes=dict(data.get("axes") or {}), n_seeds=int(data.get("n_seeds", 0)),
                   best_baseline=data.get("best_baseline"), test_seeds=[int(s) for s in data.get("test_seeds") or []],
                   test_mean=data.get("test_mean"), baseline_test_mean=data.get("baseline_test_mean"))

    def to_json(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "method": self.method, "metric": self.metric, "mode": self.mode,
                "mean": self.mean, "std": self.std, "paper": self.paper, "p_value": self.p_value,
                "subset": self.subset, "axes": self.axes, "n_seeds": self.n_seeds, "diff": self.diff,
                "best_baseline": self.best_baseline, "test_seeds": self.test_seeds, "test_mean": self.test_mean,
                "baseline_test_mean": self.baseline_test_mean}


def _key_axes(result: CellResult) -> tuple[tuple[str, Any], ...]:
    return result.cell.axis_values


def _per_user_values(result: CellResult, mode: str, metric: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = result.per_user()
    users, values = arrays[f"test/{mode}/users"], arrays[f"test/{mode}/{metric}"]
    if subset == "longtail":
        mask = arrays[f"test/{mode}/longtail"].astype(bool)
        users, values = users[mask], values[mask]
    return users, values


def _cell_value(result: CellResult, mode: str, metric: str, subset: str) -> float | None:
    if subset == "all":
        value = result.final["metrics"].get(f"test/{mode}", {}).get(metric)
        return None if value is None else float(value)
    if f"test/{mode}/{metric}" not in result.per_user():
        return None
    values = _per_user_values(result, mode, metric, subset)[1]
    return float(values.mean()) if len(values) else float("nan")


def build_rows(spec: ExperimentSpec, results: Sequence[CellResult], dataset: str) -> list[Row]:
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
                    rows.append(row)
                    index[(backbone, method, axes, metric, mode, subset)] = row
                    by_seed[(backbone, method, axes, metric, mode, subset)] = seed_values
    baselines = {m.name for m in spec.methods if m.baseline and m.name != spec.proposed}
    for (backbone, method, axes, metric, mode, subset), row in index.items():
        if method != spec.proposed or metric not in spec.test_metrics:
            continue
        ours = by_seed[(backbone, method, axes, metric, mode, subset)]
        # The best baseline is the one with the highest mean over the seeds it shares with the proposed
        # method, the seeds the paired test can use (the same as its row mean once the grid is complete).
        candidates = []
        for baseline in baselines:
            theirs = by_seed.get((backbone, baseline, axes, metric, mode, subset), {})
            shared = [theirs[seed] for seed in ours if seed in theirs]
            if shared:
                candidates.append((float(np.mean(shared)), baseline))
        if not candidates:
            continue
        best = max(candidates)[1]
        row.best_baseline = best
        row.p_value, row.test_seeds = _significance(groups[(backbone, method, axes)], groups[(backbone, best, axes)],
                                                    mode, metric, subset)
        theirs = by_seed[(backbone, best, axes, metric, mode, subset)]
        row.test_mean = float(np.mean([ours[seed] for seed in row.test_seeds]))
        row.baseline_test_mean = float(np.mean([theirs[seed] for seed in row.test_seeds]))
    return rows


def _significance(proposed: Sequence[CellResult], baseline: Sequence[CellResult], mode: str, metric: str,
                  subset: str) -> tuple[float | None, list[int]]:
    """Two-sided paired t-test over the per-user metrics of the seeds both have, and those seeds."""
    by_seed = {r.cell.seed: r for r in baseline}
    ours: list[np.ndarray] = []
    theirs: list[np.ndarray] = []
    seeds: list[int] = []
    for result in sorted(proposed, key=lambda r: r.cell.seed):
        other = by_seed.get(result.cell.seed)
        if other is None:
            continue
        seeds.append(result.cell.seed)
        users_a, values_a = _per_user_values(result, mode, metric, subset)
        users_b, values_b = _per_user_values(other, mode, metric, subset)
        if not np.array_equal(users_a, users_b):
            raise ValueError(f"{result.run_dir} and {other.run_dir} scored different test users: cannot pair them")
        ours.append(values_a)
        theirs.append(values_b)
    if not ours:
        return None, []
    return paired_t_test(np.concatenate(ours), np.concatenate(theirs)), seeds


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _metric_table(spec: ExperimentSpec, rows: Sequence[Row], subset: str, n_seeds: int = 0) -> list[str]:
    """Markdown rows of the paper's layout for one user subset (``all`` or ``longtail``); a row over fewer
    than ``n_seeds`` seeds (the report's count) says how many it has."""
    table = {(r.backbone, r.method, tuple(sorted(r.axes.items())), r.metric, r.mode): r
             for r in rows if r.subset == subset}
    axis_names = [a.name for a in spec.axes]
    lines: list[str] = []
    header = ["Backbone", "Method", *axis_names]
    for metric in spec.metrics:
        short = SHORT.get(metric, metric)
        header += [f"{short} s100", "paper", "Δ", f"{short} full"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    settings = sorted({(r.backbone, r.method, tuple(sorted(r.axes.items()))) for r in rows},
                      key=lambda s: ([b.name for b in spec.backbones].index(s[0]),
                                     [m.name for m in spec.methods].index(s[1]), s[2]))
    for backbone, method, axes in settings:
        cells = [spec.backbone_label(backbone), spec.method_label(method), *(str(v) for _, v in axes)]
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
                value = f"{row.mean:.4f}{spread}{star}"
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
                   command: str, carried: CarriedRows | None = None, missing: Sequence[Cell] = ()) -> str:
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
              f"`*`: {spec.proposed} differs from the best baseline of the same backbone (two-sided paired t-test "
              "over per-user test metrics of matching seeds, p < 0.05); p-values in the JSON rows.", ""]
    lines += _metric_table(spec, rows, "all", len(seeds))
    subsets = ["all"]
    if "longtail" in spec.figures:
        subsets.append("longtail")
        lines += ["", f"Long-tail users only (test target among the {LONGTAIL_SHARE:.0%} least popular items by "
                  "training interactions, paper Figure 2); the paper publishes no numbers for them, so its "
                  "columns are empty:", ""]
        lines += _metric_table(spec, rows, "longtail", len(seeds))
    lines += _partial_tests(spec, rows, subsets)
    if missing:
        lines += ["", f"Not finished yet: {len(missing)} cell(s) of this grid are left out of the rows above (report "
                  "written with `--finished-only`; rerun without it to train them):", "",
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
    for kind, subset, filename in (("longtail", "longtail", "longtail.png"), ("methods", "all", f"{spec.name}.png")):
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
                 command: str, carried: CarriedRows | None = None, missing: Sequence[Cell] = ()) -> dict[str, Any]:
    """Write ``<name>.md``, ``<name>.json`` (the rows), ``<name>.cells.json`` (cell times and run
    directories) and the figures into ``out_dir``; ``carried`` rows (other backbones) are kept beside the new,
    ``missing`` cells (not finished, ``--finished-only``) are named in the markdown."""
    if not results and not (carried and carried.rows):
        raise ValueError(f"no finished cells to report for {spec.name}"
                         + (f" ({len(missing)} not finished)" if missing else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [*(carried.rows if carried else []), *build_rows(spec, results, dataset)]
    records = [*(carried.cells if carried else []), *cell_records(results, command)]
    table_path = out_dir / f"{spec.name}.md"
    table_path.write_text(markdown_table(spec, rows, records, dataset, command, carried, missing), encoding="utf-8")
    json_path = out_dir / f"{spec.name}.json"
    json_path.write_text(json.dumps([r.to_json() for r in rows], indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / f"{spec.name}.cells.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    figures = write_figures(spec, rows, out_dir)
    return {"table": table_path, "json": json_path, "figures": figures, "rows": rows}
