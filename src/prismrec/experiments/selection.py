"""Options chosen on validation inside a grid (an experiment's ``[select]`` table).

Some options are not part of a method but of its recipe, and the fair comparison gives every method the
recipe that suits it best, chosen the same way for all: the loss, say. ``[select]`` names an axis of the grid
whose value is *chosen*, not reported:

1. on the selection seeds (default: the experiment's first seed) every value of the axis trains, for every
   method, backbone and value of the other axes;
2. per (method, backbone, other axes) the value with the highest validation metric (``metric``, read from the
   best checkpoint's ``final.json``; mean over the selection seeds; ties go to the value listed first) is
   chosen. Test metrics never enter the choice;
3. the remaining seeds train only the chosen value, and the report's rows are over the chosen cells of every
   seed (the selection seeds' included), the axis dropped from the row and the choice written beside it.

The same rule, epoch budget and patience apply to every method, so no method's recipe is tuned more than
another's.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prismrec.experiments.runner import CellResult
from prismrec.experiments.spec import Cell, ExperimentSpec

GroupKey = tuple[str, str, tuple[tuple[str, Any], ...]]  # method, backbone, the other axes' values


def validation_value(result: CellResult, metric: str) -> float:
    """``metric`` ("valid/sampled/ndcg@10") of a finished cell's best checkpoint."""
    split, mode, name = _parse_metric(metric)
    try:
        return float(result.final["metrics"][f"{split}/{mode}"][name])
    except KeyError:
        raise ValueError(f"cell {result.cell.cell_id} ({result.run_dir}) has no {metric} in final.json") from None


def _parse_metric(metric: str) -> tuple[str, str, str]:
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "valid" or parts[1] not in ("sampled", "full"):
        raise ValueError(f"select.metric must look like valid/sampled/ndcg@10 or valid/full/hit@10, got {metric!r} "
                         "(choices are made on validation, never on test)")
    return parts[0], parts[1], parts[2]


@dataclass
class Selection:
    """The choice per group and the validation values behind it (for the report)."""

    axis: str
    metric: str
    seeds: list[int]
    chosen: dict[GroupKey, Any] = field(default_factory=dict)
    # group -> axis value -> validation value per selection seed
    evidence: dict[GroupKey, dict[Any, dict[int, float]]] = field(default_factory=dict)
    undecided: list[GroupKey] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        rows = []
        for (method, backbone, axes), values in self.evidence.items():
            rows.append({"method": method, "backbone": backbone, "axes": dict(axes), "axis": self.axis,
                         "metric": self.metric, "seeds": self.seeds,
                         "values": {str(v): {str(s): x for s, x in by_seed.items()} for v, by_seed in values.items()},
                         "chosen": self.chosen.get((method, backbone, axes))})
        return rows


def selection_seeds(spec: ExperimentSpec, seeds: Sequence[int]) -> list[int]:
    assert spec.select is not None
    chosen = [s for s in (spec.select.seeds or seeds[:1]) if s in seeds]
    if not chosen:
        raise ValueError(f"experiment {spec.name}: none of the selection seeds {spec.select.seeds} is among the "
                         f"seeds run ({', '.join(map(str, seeds))})")
    return chosen


def group_of(cell: Cell, axis: str) -> GroupKey:
    return cell.method, cell.backbone, tuple((k, v) for k, v in cell.axis_values if k != axis)


def axis_value(cell: Cell, axis: str) -> Any:
    return dict(cell.axis_values)[axis]


def choose(spec: ExperimentSpec, cells: Sequence[Cell], results: Sequence[CellResult],
           seeds: Sequence[int]) -> Selection:
    """Pick each group's value from the finished selection cells; a group with a value not finished on every
    selection seed stays undecided (a grid part-way through)."""
    assert spec.select is not None
    axis, metric = spec.select.axis, spec.select.metric
    selection = Selection(axis, metric, list(seeds))
    finished = {r.cell.cell_id: r for r in results}
    order = [v for a in spec.axes if a.name == axis for v in a.values]
    wanted: dict[GroupKey, dict[Any, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        if cell.seed in seeds:
            wanted[group_of(cell, axis)][axis_value(cell, axis)].append(cell)
    for group, by_value in wanted.items():
        evidence: dict[Any, dict[int, float]] = {}
        complete = True
        for value, value_cells in by_value.items():
            evidence[value] = {c.seed: validation_value(finished[c.cell_id], metric)
                               for c in value_cells if c.cell_id in finished}
            complete &= len(evidence[value]) == len(value_cells)
        selection.evidence[group] = evidence
        if not complete:
            selection.undecided.append(group)
            continue
        # Highest mean validation value; ties go to the value listed first in the axis.
        selection.chosen[group] = max(by_value, key=lambda v: (float(np.mean(list(evidence[v].values()))),
                                                               -order.index(v)))
    return selection


def chosen_cells(cells: Sequence[Cell], selection: Selection) -> tuple[list[Cell], list[Cell]]:
    """The cells of the non-selection seeds to run (the chosen value of decided groups), and those waiting for a
    choice (undecided groups), none of which runs yet.

    Only one value of an undecided group will ever train per seed, so each waiting (group, seed) is one cell,
    named without the selected axis (``None-bert4rec-s43``): counting every value would overstate what is left.
    Its ``config`` is still the first value's: a waiting cell names and counts what is left, it never runs.
    """
    run: list[Cell] = []
    waiting: dict[tuple[GroupKey, int], Cell] = {}
    for cell in cells:
        if cell.seed in selection.seeds:
            continue
        group = group_of(cell, selection.axis)
        if group in selection.chosen:
            if axis_value(cell, selection.axis) == selection.chosen[group]:
                run.append(cell)
        else:
            waiting.setdefault((group, cell.seed), dataclasses.replace(cell, axis_values=group[2]))
    return run, list(waiting.values())


def report_results(results: Sequence[CellResult], selection: Selection) -> list[CellResult]:
    """The chosen cells' results with the selected axis dropped, so each (method, backbone) is one row."""
    kept = []
    for result in results:
        group = group_of(result.cell, selection.axis)
        if selection.chosen.get(group, object()) != axis_value(result.cell, selection.axis):
            continue
        cell = dataclasses.replace(result.cell, axis_values=group[2])
        kept.append(dataclasses.replace(result, cell=cell))
    return kept
