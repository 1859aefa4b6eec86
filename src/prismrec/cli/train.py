"""``prismrec train`` and ``prismrec evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prismrec.cli.common import metrics_table
from prismrec.data.errors import DataError
from prismrec.options import ConfigError, command_line_overrides

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console()


@commands.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.lr=0.0005")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue this (killed) run directory from its "
                                                "last checkpoint, with the configuration it was started with")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Train a model; results land in $PRISMREC_HOME/runs/<name>-<timestamp>/.

    Under ``torchrun --nproc_per_node N -m prismrec train ...`` it trains data parallel; rank 0 writes.
    """
    from prismrec.config import load_config
    from prismrec.training import Trainer
    from prismrec.training.checkpoint import CheckpointError
    from prismrec.training.runs import load_run_config

    overrides = command_line_overrides(set_, data_dir)
    try:
        if resume is not None:
            if config is not None or overrides:
                raise ConfigError("--resume takes the configuration saved in the run directory; "
                                  "drop --config/--set/--data-dir")
            if not (resume / "config.toml").is_file():
                raise ConfigError(f"{resume}: not a run directory (no config.toml)")
            cfg = load_run_config(resume)
            trainer = Trainer(cfg, run_dir=resume, quiet=quiet, resume=True)
        else:
            cfg = load_config(config, overrides)
            trainer = Trainer(cfg, quiet=quiet)
    except (ConfigError, DataError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    main = trainer.is_main
    if main:
        console.print(f"{'resuming' if resume else 'run directory'}: {trainer.run_dir}")
    try:
        outcome = trainer.fit()
    except CheckpointError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if main:
        resumed = f", resumed after epoch {outcome.resumed_from_epoch}" if outcome.resumed_from_epoch else ""
        console.print(metrics_table(f"{cfg.name}: best epoch {outcome.best_epoch} of {outcome.epochs_run} "
                                    f"({outcome.seconds:.0f}s{resumed})", outcome.final))
        console.print(f"saved: {outcome.run_dir}")


@commands.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prismrec train`")],
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
) -> None:
    """Re-score a saved run (best checkpoint) and compare with the numbers it recorded."""
    from prismrec.training import evaluate_run

    try:
        final = evaluate_run(run_dir, data_dir)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(metrics_table(f"re-evaluated {run_dir}", final))
    recorded_path = Path(run_dir) / "final.json"
    if recorded_path.exists():
        recorded = json.loads(recorded_path.read_text())["metrics"]
        worst = max(abs(final[k][m] - recorded[k][m]) for k in final if k in recorded for m in final[k])
        console.print(f"largest difference from the recorded final.json: {worst:.2e}")
