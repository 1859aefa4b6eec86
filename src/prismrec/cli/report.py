"""``prismrec compare``: put the final metrics of several runs side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prismrec.data.paths import prismrec_home

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console()


def resolve_run(name_or_dir: str) -> Path:
    """A run directory, or the newest ``runs/<name>-<timestamp>`` for a run name."""
    path = Path(name_or_dir)
    if (path / "final.json").exists():
        return path
    candidates = sorted((prismrec_home() / "runs").glob(f"{name_or_dir}-*"),
                        key=lambda p: p.stat().st_mtime)
    finished = [p for p in candidates if (p / "final.json").exists()]
    if not finished:
        raise FileNotFoundError(f"no finished run {name_or_dir!r} (neither a run directory nor a run name "
                                f"under {prismrec_home() / 'runs'})")
    return finished[-1]


@commands.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="run directories or run names (newest run of that name)")],
    metrics: Annotated[str, typer.Option(help="comma-separated metric names")] = "hit@10,ndcg@10",
) -> None:
    """Print test and validation metrics of runs side by side (sampled-100 and full ranking)."""
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    try:
        resolved = [resolve_run(r) for r in runs]
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    finals = [json.loads((r / "final.json").read_text()) for r in resolved]
    # One column per run, one row per (split/mode, metric): stays readable in an 80-column terminal.
    table = Table(title="final metrics (best validation checkpoint)")
    table.add_column("split/mode metric")
    for run in resolved:
        table.add_column(run.name, justify="right", overflow="fold")
    table.add_row("best epoch", *(str(final.get("best_epoch", "")) for final in finals))
    keys = [k for k in ("test/sampled", "test/full", "valid/sampled", "valid/full") if k in finals[0]["metrics"]]
    for key in keys:
        for name in names:
            table.add_row(f"{key} {name}",
                          *(f"{final['metrics'].get(key, {}).get(name, float('nan')):.4f}" for final in finals))
    console.print(table)
