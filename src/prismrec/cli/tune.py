"""``prismrec tune``: an Optuna study over options of a run config (:mod:`prismrec.experiments.tuning`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prismrec.data.errors import DataError
from prismrec.options import ConfigError, command_line_overrides

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console()


def trials_table(name: str, rows: list[dict[str, Any]], params: list[str], metric: str) -> Table:
    table = Table(title=f"study {name}: trials")
    for column in ("#", "state", metric, *params, "epochs", "s"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in rows:
        value = f"{row['value']:.4f}" if row["value"] is not None else "-"
        shown = [f"{v:.4g}" if isinstance(v := row["params"].get(p), float) else str(v if v is not None else "-")
                 for p in params]
        epochs = ",".join(map(str, row["epochs"])) or str(row["last_epoch"] or "-")
        state = row["state"].lower() + (" (killed)" if row["killed"] else "")
        table.add_row(str(row["number"]), state, value, *shown, epochs,
                      f"{row['seconds']:.0f}" if row["seconds"] is not None else "-")
    return table


@commands.command()
def tune(
    config: Annotated[Path, typer.Argument(help="TOML run configuration every trial starts from")],
    space: Annotated[Path, typer.Option("--space", help="search-space TOML (see configs/tune/ and docs/tuning.md)")],
    trials: Annotated[int | None, typer.Option(help="finished trials to reach (default: the space file's)")] = None,
    study: Annotated[str | None, typer.Option(help="study name (default: the space file's name)")] = None,
    storage: Annotated[str | None, typer.Option(help="SQLAlchemy URL shared by every worker (default: SQLite "
                                                "$PRISMREC_HOME/tuning/NAME.db); postgresql://... for many "
                                                "machines")] = None,
    workers: Annotated[int, typer.Option(help="local worker processes on this study")] = 1,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override of the run config for every trial, "
                                                   "e.g. training.max_epochs=50")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    heartbeat: Annotated[int, typer.Option(help="seconds between a running trial's heartbeats; a trial silent for "
                                           "3 heartbeats is marked failed (its worker died)")] = 10,
    out: Annotated[Path | None, typer.Option(help="report folder (default $PRISMREC_HOME/reports/tuning)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Search hyperparameters with Optuna; each trial is a normal run directory, the objective a validation
    metric. A killed worker or tune continues where it stopped when run again; a finished study reruns nothing."""
    from prismrec.experiments.tuning import tune as run_tune
    from prismrec.experiments.tuning.study import WorkerError

    if heartbeat < 1:
        raise typer.BadParameter("--heartbeat must be at least 1 second")
    overrides = command_line_overrides(set_, data_dir)
    command = " ".join(shlex.quote(a) for a in ["prismrec", *sys.argv[1:]]) if sys.argv[1:2] == ["tune"] \
        else f"prismrec tune {config} --space {space}"
    try:
        result = run_tune(config, space, overrides, study, storage, trials, workers, heartbeat, out, command, quiet,
                          console)
    except (ConfigError, DataError, WorkerError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")  # the messages quote [sections]
        raise typer.Exit(2) from None
    summary = result.report["summary"]
    console.print(trials_table(result.study, result.report["rows"], summary["param_names"],
                               f"valid {summary['metric']}"))
    if summary["best_trial"] is not None:
        console.print(f"best: trial {summary['best_trial']}, valid {summary['mode']} {summary['metric']} "
                      f"{summary['best_value']:.4f}, {summary['best_params']}")
        console.print(f"best config: {result.report['best_config']}  (prismrec train --config ...)")
    console.print(f"report:  {result.report['table']}\nrows:    {result.report['json']}\n"
                  f"figure:  {result.report['figure']}")
    if not result.complete:
        console.print(f"[yellow]study incomplete: {result.counts.finished} of {result.space.trials} trials finished "
                      f"(workers exited with {result.worker_codes}); run the same command again to continue[/yellow]")
        raise typer.Exit(1)
