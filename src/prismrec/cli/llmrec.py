"""``prismrec mllm-msr ...`` and ``prismrec speeder ...``: the LLM-as-recommender paradigms (:mod:`prismrec.llmrec`).

MLLM-MSR (recurrent user summaries, a LoRA-tuned yes/no recommender) trains and re-evaluates run directories;
Speeder (compressed multimodal item tokens, MPO, SPAE) trains stage by stage. Neither goes through the
``Trainer``, so each has its own command group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prismrec.cli.common import metrics_table
from prismrec.data.errors import DataError
from prismrec.options import ConfigError, command_line_overrides

mllm_msr_app = typer.Typer(no_args_is_help=True, help="MLLM-MSR: recurrent user summaries + a LoRA-tuned LLM "
                           "recommender (yes/no per candidate).")
speeder_app = typer.Typer(no_args_is_help=True, help="Speeder: an LLM recommender over compressed item tokens.")

console = Console()
err_console = Console(stderr=True)


def _metrics_table(title: str, final: dict[str, dict[str, float]]) -> None:
    console.print(metrics_table(title, final))


# --- prismrec mllm-msr ----------------------------------------------------------------------------------
@mllm_msr_app.command("train")
def mllm_msr_train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.train_users=8")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Summarise users, fine-tune the LLM with LoRA, evaluate on sampled candidates; writes runs/<name>-<time>/."""
    from prismrec.llmrec.mllm_msr import SummaryError, load_mllm_msr_config, run_mllm_msr
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
def mllm_msr_evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prismrec mllm-msr train`")],
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Re-score a saved run (its LoRA adapter, users and candidates) and compare with its final.json."""
    from prismrec.llmrec.mllm_msr import SummaryError, evaluate_mllm_msr_run

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


# --- prismrec speeder -----------------------------------------------------------------------------------
@speeder_app.command("train")
def speeder_train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML (configs/movielens_speeder.toml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.batch_size=4")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="write here instead of a new run directory")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Train Speeder stage by stage (text, +visual, +collaborative and LoRA) and evaluate it."""
    from prismrec.llmrec.speeder import SpeederError, fit_run, load_run_config
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
