"""``prismrec mllm-msr train`` and ``prismrec mllm-msr evaluate``: the LLM-as-recommender paradigm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prismrec.cli import app
from prismrec.config import ConfigError, command_line_overrides
from prismrec.data.errors import DataError

mllm_msr_app = typer.Typer(no_args_is_help=True, help="MLLM-MSR: recurrent user summaries + a LoRA-tuned LLM "
                           "recommender (yes/no per candidate).")
app.add_typer(mllm_msr_app, name="mllm-msr")

console = Console()
err_console = Console(stderr=True)


def _metrics_table(title: str, final: dict[str, dict[str, float]]) -> None:
    from prismrec.cli_train import metrics_table

    console.print(metrics_table(title, final))


@mllm_msr_app.command("train")
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.train_users=8")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Summarise users, fine-tune the LLM with LoRA, evaluate on sampled candidates; writes runs/<name>-<time>/."""
    from prismrec.models.mllm_msr import SummaryError, load_mllm_msr_config, run_mllm_msr
    from prismrec.semantics.artefact import ArtefactError

    overrides = command_line_overrides(set_, data_dir)
    try:
        cfg = load_mllm_msr_config(config, overrides)
        run_dir, result = run_mllm_msr(cfg, console=err_console, quiet=quiet)
    except (ConfigError, DataError, ArtefactError, FileNotFoundError, ImportError, SummaryError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    timings = result["timings"]
    _metrics_table(f"{cfg.name}: {result['users']['eval']} users, {cfg.evaluation.num_negatives} negatives, "
                   f"{result['train_samples']} training samples ({timings['total_seconds']:.0f}s)", result["metrics"])
    console.print(f"training {timings['train_samples_per_s']:.2f} samples/s, scoring "
                  f"{timings['test_score_candidates_per_s']:.2f} candidates/s, "
                  f"{timings['test_prompt_tokens_per_candidate']:.0f} prompt tokens per candidate")
    console.print(f"saved: {run_dir}")


@mllm_msr_app.command("evaluate")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prismrec mllm-msr train`")],
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Re-score a saved run (its LoRA adapter, users and candidates) and compare with its final.json."""
    from prismrec.models.mllm_msr import SummaryError, evaluate_mllm_msr_run

    if not (run_dir / "config.toml").is_file() or not (run_dir / "meta.json").is_file():
        err_console.print(f"[red]error:[/red] {run_dir}: not an mllm-msr run directory (config.toml, meta.json)")
        raise typer.Exit(2)
    try:
        final = evaluate_mllm_msr_run(run_dir, data_dir, console=err_console, quiet=quiet)
    except (ConfigError, DataError, FileNotFoundError, SummaryError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _metrics_table(f"re-evaluated {run_dir}", final)
    recorded_path = run_dir / "final.json"
    if recorded_path.exists():
        recorded = json.loads(recorded_path.read_text())["metrics"]
        worst = max(abs(final[k][m] - recorded[k][m]) for k in final if k in recorded for m in final[k])
        console.print(f"largest difference from the recorded final.json: {worst:.2e}")
