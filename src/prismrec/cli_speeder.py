"""``prismrec speeder train``: Speeder (compressed multimodal item tokens, MPO, SPAE) on an LLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prismrec.cli import app
from prismrec.config import ConfigError, command_line_overrides
from prismrec.data.errors import DataError

console = Console()
speeder_app = typer.Typer(no_args_is_help=True, help="Speeder: an LLM recommender over compressed item tokens.")
app.add_typer(speeder_app, name="speeder")


@speeder_app.command("train")
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML (configs/movielens_speeder.toml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.batch_size=4")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="write here instead of a new run directory")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train Speeder stage by stage (text, +visual, +collaborative and LoRA) and evaluate it."""
    from prismrec.models.speeder import SpeederError, fit_run, load_run_config
    from prismrec.semantics.artefact import ArtefactError

    overrides = command_line_overrides(set_, data_dir)
    try:
        cfg = load_run_config(config, overrides)
        result = fit_run(cfg, run_dir=run_dir, quiet=quiet)
    except (ConfigError, DataError, ArtefactError, SpeederError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    stages = Table(title=f"{cfg.name}: MPO stages (validation)")
    for column in ("stage", "modalities", "LoRA", "steps", "retrieval loss", "H@10", "choice Hit@1"):
        stages.add_column(column)
    for record in result["stages"]:
        valid = record["valid"]
        stages.add_row(record["name"], "+".join(record["modalities"]), "yes" if record["lora"] else "no",
                       str(record["steps"]), f"{record['last_retrieval_loss']:.4f}",
                       f"{valid.get('hit@10', float('nan')):.4f}",
                       f"{valid.get('choice_hit@1', float('nan')):.4f}")
    console.print(stages)
    final = Table(title=f"final ({result['evaluated_users']} users)")
    for column in ("split", "H@10", "N@10", "Hit@1 of choices", "valid answers"):
        final.add_column(column)
    for stage in ("valid", "test"):
        sampled, choice = result["metrics"][f"{stage}/sampled"], result["metrics"][f"{stage}/choice"]
        final.add_row(stage, f"{sampled['hit@10']:.4f}", f"{sampled['ndcg@10']:.4f}", f"{choice['hit@1']:.4f}",
                      f"{choice['valid_answer_rate']:.2f}")
    console.print(final)
    console.print(f"saved: {result['run_dir']}")
