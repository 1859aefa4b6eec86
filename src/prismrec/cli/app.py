"""The ``prismrec`` command line, assembled from one module per command group (typer).

Each module under :mod:`prismrec.cli` defines its commands on a typer app of its own and imports nothing
from here; this module puts them together, in the order of the data's journey:

* ``data stats|download|fetch-images``: :mod:`prismrec.cli.data` over :mod:`prismrec.data`;
* ``derive``, ``semantics status|show``: :mod:`prismrec.cli.semantics` over :mod:`prismrec.semantics`;
* ``train``, ``evaluate``: :mod:`prismrec.cli.train` over :mod:`prismrec.training`;
* ``compare``: :mod:`prismrec.cli.report` (finished run directories side by side);
* ``reproduce``: :mod:`prismrec.cli.experiments` over :mod:`prismrec.experiments`;
* ``tune``: :mod:`prismrec.cli.tune` over :mod:`prismrec.experiments.tuning` (Optuna, imported lazily);
* ``export``, ``serve``, ``recommend``: :mod:`prismrec.cli.serving` over :mod:`prismrec.serving`;
* ``mllm-msr train|evaluate``, ``speeder train``: :mod:`prismrec.cli.llmrec` over :mod:`prismrec.llmrec`.

Heavy imports (torch, the models) happen inside the commands, so ``prismrec --help`` stays fast.
"""

from __future__ import annotations

import typer

from prismrec.cli import data, experiments, llmrec, report, semantics, serving, train, tune

app = typer.Typer(no_args_is_help=True, add_completion=False, help="prismrec: MLLM-enhanced sequential recommendation")
app.add_typer(data.data_app, name="data")
app.add_typer(semantics.commands)  # derive
app.add_typer(semantics.semantics_app, name="semantics")
app.add_typer(train.commands)  # train, evaluate
app.add_typer(report.commands)  # compare
app.add_typer(experiments.commands)  # reproduce
app.add_typer(tune.commands)  # tune
app.add_typer(serving.commands)  # export, serve, recommend
app.add_typer(llmrec.mllm_msr_app, name="mllm-msr")
app.add_typer(llmrec.speeder_app, name="speeder")


def main() -> None:
    app()
