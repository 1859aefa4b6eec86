"""``prismrec reproduce``: run an experiment grid from ``configs/experiments/`` and write its report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from prismrec.data.errors import DataError

if TYPE_CHECKING:
    from prismrec.experiments import Cell, ExperimentRunner, ExperimentSpec
from prismrec.options import ConfigError, command_line_overrides

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console()


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--seeds must be comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option (``--backbones``, ``--methods``) as a list; None (everything) when not given."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else []
    return names or None


def _selection_plan(spec: ExperimentSpec, cells: list[Cell], checker: ExperimentRunner,
                    seeds: list[int] | None) -> tuple[list[Cell], list[Cell]]:
    """Cells of an experiment with a [select] axis as the run would train them: the selection seeds' cells,
    then the chosen value's cells of the other seeds where the choice is made; the rest wait for it."""
    from prismrec.experiments.runner import ExperimentRunner
    from prismrec.experiments.selection import choose, chosen_cells, selection_seeds

    chosen_seeds = selection_seeds(spec, list(seeds or spec.seeds))
    first = [c for c in cells if c.seed in chosen_seeds]
    finished = ExperimentRunner(spec, [c for c in first if checker.is_done(c)], records=checker.records,
                                quiet=True, finished_only=True).run()
    selection = choose(spec, cells, finished, chosen_seeds)
    later, waiting = chosen_cells(cells, selection)
    return [*first, *later], waiting


@commands.command()
def reproduce(
    experiment: Annotated[str, typer.Argument(help="table2, table3, longtail, alpha, dim, mllm (a file in "
                                                   "configs/experiments/) or the path of an experiment TOML")],
    dataset: Annotated[str, typer.Option(help="registered dataset name")] = "movielens-small",
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds (default: the experiment's)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override applied to every cell, "
                                                   "e.g. training.max_epochs=50")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    out: Annotated[Path | None, typer.Option(help="report folder (default "
                                             "$PRISMREC_HOME/reports/<experiment>)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and which are done; "
                                          "train nothing")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress view")] = False,
    backbones: Annotated[str | None, typer.Option(help="comma-separated subset of the experiment's backbones "
                                                  "(default: all)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of the experiment's methods "
                                                "(default: all), e.g. None,DMESR first")] = None,
    keep_rows: Annotated[bool, typer.Option("--keep-rows", help="keep the rows of backbones not run now from the "
                                            "report already in --out (finish a grid backbone by backbone)")] = False,
    records: Annotated[Path | None, typer.Option(help="folder of cell records (results without weights, small "
                                                 "enough to commit): finished cells are reused from it and "
                                                 "copied to it, so they outlive the machine")] = None,
    finished_only: Annotated[bool, typer.Option("--finished-only", help="train nothing: report the cells "
                                                "already finished and list the rest (a table part-way "
                                                "through a long grid)")] = False,
) -> None:
    """Run every cell of an experiment (reusing finished ones) and write table, JSON rows and figures."""
    from prismrec.experiments import (
        expand_cells,
        experiment_path,
        load_experiment,
        restrict_backbones,
        restrict_methods,
    )
    from prismrec.experiments import reproduce as run_experiment
    from prismrec.experiments.runner import CellBusyError, ExperimentRunner, NotFinishedError
    from prismrec.semantics.artefact import derive_command

    overrides = command_line_overrides(set_, data_dir)
    backbone_names, method_names = _names(backbones), _names(methods)
    command = " ".join(shlex.quote(a) for a in ["prismrec", *sys.argv[1:]]) if sys.argv[1:2] == ["reproduce"] \
        else f"prismrec reproduce {experiment} --dataset {dataset}"
    try:
        if dry_run:
            spec = restrict_methods(restrict_backbones(load_experiment(experiment_path(experiment)), backbone_names),
                                    method_names)
            cells = expand_cells(spec, dataset, _seeds(seeds), overrides)
            checker = ExperimentRunner(spec, cells, records=records)
            waiting: list = []
            if spec.select is not None:
                cells, waiting = _selection_plan(spec, cells, checker, _seeds(seeds))
            done = 0
            for cell in cells:
                finished = checker.is_done(cell)
                done += finished
                console.print(f"{'done' if finished else 'todo'}  {cell.cell_id}  ({cell.config.config_hash()})")
            if waiting and spec.select is not None:
                console.print(f"later: {len(waiting)} cells train once the selection cells have chosen "
                              f"{spec.select.axis} (listed above: the selection cells and the chosen ones)")
            console.print(f"{len(cells)} cells: {done} done, {len(cells) - done} left")
            for name, needed_by in checker.missing_artefacts().items():
                console.print(f"missing semantics {name} ({len(needed_by)} cell(s)): {derive_command(name)}")
            return
        report = run_experiment(experiment, dataset, _seeds(seeds), overrides, out_dir=out, command=command,
                                quiet=quiet, backbones=backbone_names, keep_rows=keep_rows, records=records,
                                methods=method_names, finished_only=finished_only)
    except (ConfigError, DataError, ValueError, FileNotFoundError, CellBusyError, NotFinishedError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"{len(report['results'])} cells ({len(report['trained'])} trained now, "
                  f"{len(report['results']) - len(report['trained'])} reused"
                  + (f", {len(report['missing'])} not finished and left out)" if finished_only else ")"))
    console.print(f"table:   {report['table']}\nrows:    {report['json']}")
    for figure in report["figures"]:
        console.print(f"figure:  {figure}")
