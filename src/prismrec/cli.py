"""The ``prismrec`` command line: a thin layer over the library (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="prismrec: MLLM-enhanced sequential recommendation")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, download and prepare datasets.")
app.add_typer(data_app, name="data")

# --- sub-command registration (each stage's package owns its commands) -----------------------------
from prismrec import cli_data as _cli_data  # noqa: E402,F401  (data commands)
from prismrec import cli_experiments as _cli_experiments  # noqa: E402,F401  (reproduce)
from prismrec import cli_mllm_msr as _cli_mllm_msr  # noqa: E402,F401  (mllm-msr train/evaluate)
from prismrec import cli_report as _cli_report  # noqa: E402,F401  (compare)
from prismrec import cli_semantics as _cli_semantics  # noqa: E402,F401  (derive, semantics status/show)
from prismrec import cli_serving as _cli_serving  # noqa: E402,F401  (export, serve, recommend)
from prismrec import cli_speeder as _cli_speeder  # noqa: E402,F401  (speeder train)
from prismrec import cli_train as _cli_train  # noqa: E402,F401  (train, evaluate)

# (more stages register here)


def main() -> None:
    app()
