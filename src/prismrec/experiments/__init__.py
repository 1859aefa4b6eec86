"""Experiment grids that reproduce the paper's tables and figures (``prismrec reproduce``).

``reproduce(...)`` = load an experiment file (:mod:`.spec`), run or reuse every cell (:mod:`.runner`), and
write the report (:mod:`.report`) under ``$PRISMREC_HOME/reports/<experiment>/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prismrec.data.paths import output_dir
from prismrec.evaluation.statistics import paired_t_test
from prismrec.experiments.report import load_carried_rows, write_report
from prismrec.experiments.runner import CellResult, ExperimentRunner
from prismrec.experiments.selection import Selection, choose, chosen_cells, selection_seeds
from prismrec.experiments.spec import (
    Cell,
    ExperimentSpec,
    expand_cells,
    load_experiment,
    restrict_backbones,
    restrict_methods,
)
from prismrec.options import ConfigError

__all__ = ["Cell", "CellResult", "ExperimentRunner", "ExperimentSpec", "expand_cells", "experiment_path",
           "load_experiment", "paired_t_test", "reproduce", "restrict_backbones", "restrict_methods",
           "write_report"]

EXPERIMENTS_DIR = Path(__file__).resolve().parents[3] / "configs" / "experiments"


def experiment_path(name_or_path: str) -> Path:
    """A path to an experiment TOML, or the name of one in ``configs/experiments/``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path}")
        return path
    for folder in (Path.cwd() / "configs" / "experiments", EXPERIMENTS_DIR):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
    raise ConfigError(f"unknown experiment {name_or_path!r}; known: {', '.join(known) or '(none)'}")


def reproduce(experiment: str | Path, dataset: str, seeds: Sequence[int] | None = None,
              overrides: Sequence[str] = (), out_dir: Path | None = None, runs_root: Path | None = None,
              command: str = "", quiet: bool = False, backbones: Sequence[str] | None = None,
              keep_rows: bool = False, records: Path | None = None,
              methods: Sequence[str] | None = None, finished_only: bool = False) -> dict[str, Any]:
    """Run (or reuse) every cell of an experiment and write its report; returns the report's paths and rows.

    ``keep_rows``: keep the rows of the backbones *not* run now from the report already in the output folder
    (a grid finished backbone by backbone, on different machines or days, ends in one table).
    ``records``: a folder of cell records (see :mod:`.runner`) reused and extended, so finished cells
    outlive the machine.
    ``methods``: run (and report) only these methods; the cells are the whole grid's, so a later run over every
    method reuses them.
    ``finished_only``: train nothing; report the cells already finished (run directories or records) and name
    the rest (``missing`` in the result), e.g. a table part-way through a grid other processes still train.
    """
    full_spec = load_experiment(experiment_path(str(experiment)))
    spec = restrict_methods(restrict_backbones(full_spec, backbones), methods)
    cells = expand_cells(spec, dataset, seeds, overrides)
    out = out_dir or output_dir("reports") / spec.name
    carried = load_carried_rows(out, spec.name, [b.name for b in spec.backbones]) if keep_rows else None
    def runner_for(chosen: Sequence[Cell]) -> ExperimentRunner:
        return ExperimentRunner(spec, chosen, runs_root=runs_root, quiet=quiet, records=records,
                                finished_only=finished_only)

    selection: Selection | None = None
    if spec.select is None:
        runner = runner_for(cells)
        results, trained, missing = runner.run(), list(runner.trained), list(runner.missing)
    else:
        # Two phases (see .selection): every value on the selection seeds, then the chosen value on the rest.
        chosen_seeds = selection_seeds(spec, list(seeds or spec.seeds))
        first = runner_for([c for c in cells if c.seed in chosen_seeds])
        results = first.run()
        selection = choose(spec, cells, results, chosen_seeds)
        to_run, waiting = chosen_cells(cells, selection)
        second = runner_for(to_run)
        results += second.run()
        trained = [*first.trained, *second.trained]
        missing = [*first.missing, *second.missing, *waiting]
    report = write_report(full_spec if carried else spec, results, dataset, out,
                          command or f"prismrec reproduce {spec.name} --dataset {dataset}", carried, missing,
                          selection=selection)
    return {**report, "results": results, "trained": trained, "missing": missing, "spec": spec,
            "selection": selection}
