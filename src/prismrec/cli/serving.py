"""``prismrec export``, ``prismrec serve`` and ``prismrec recommend``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prismrec.data.errors import DataError
from prismrec.options import ConfigError

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console(stderr=True, soft_wrap=True)
TOKEN_ENV = "PRISMREC_SERVE_TOKEN"


@commands.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `prismrec train`")],
    out_dir: Annotated[Path, typer.Argument(help="folder to write the export into (created or replaced)")],
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="folder with one sub-folder per dataset")] = None,
) -> None:
    """Write everything inference needs (weights, item tables, id maps, config, checksums) into OUT_DIR."""
    from prismrec.semantics.artefact import ArtefactError
    from prismrec.serving.export import ExportError, export_run

    try:
        path = export_run(run_dir, out_dir, data_dir)
    except (ConfigError, DataError, ExportError, ArtefactError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    size = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    console.print(f"exported {run_dir} -> {path} ({size:.1f} MB)")


def _load(out_dirs: list[Path], data_dir: Path | None, index: str) -> list:
    from prismrec.serving.export import ExportError, load_export

    try:
        return [load_export(d, data_dir=data_dir, index=index) for d in out_dirs]  # type: ignore[arg-type]
    except (ExportError, ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@commands.command()
def serve(
    out_dirs: Annotated[list[Path], typer.Argument(help="one or more exports; the explorer compares them")],
    host: Annotated[str, typer.Option(help="address to bind (default: loopback only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="where the dataset (posters) is now")] = None,
    index: Annotated[str, typer.Option(help="exact (matrix product + topk) or faiss (needs faiss-cpu)")] = "exact",
    threads: Annotated[int, typer.Option(help="torch CPU threads per worker")] = 1,
    workers: Annotated[int, typer.Option(help="server processes sharing the port (each memory-maps the "
                                              "exports, so the weights are held once)")] = 1,
    max_k: Annotated[int, typer.Option(help="largest k a request may ask for")] = 1000,
    max_body_bytes: Annotated[int, typer.Option(help="largest request body, however framed (413 beyond)")] = 1 << 20,
    max_header_bytes: Annotated[int, typer.Option(help="largest request line + headers (431 beyond)")] = 16 << 10,
    max_headers: Annotated[int, typer.Option(help="most header lines a request may have (431 beyond)")] = 100,
    read_timeout: Annotated[float, typer.Option(help="seconds a client has to send a whole request (408 after)"
                                                )] = 10.0,
    max_in_flight: Annotated[int, typer.Option(help="requests handled at once per worker (503 + Retry-After "
                                                    "beyond)")] = 128,
    graceful_timeout: Annotated[int, typer.Option(help="seconds SIGTERM waits for requests in flight")] = 30,
    access_log: Annotated[bool, typer.Option(help="log each request line")] = False,
) -> None:
    """Serve the HTTP API, /metrics and the explorer page. A bearer token is required when
    $PRISMREC_SERVE_TOKEN is set. SIGTERM finishes the requests in flight, refuses new ones and exits."""
    from prismrec.serving.limits import ServerLimits
    from prismrec.serving.server import ServeSpec, build_app, run

    if index not in ("exact", "faiss"):
        console.print(f"[red]error:[/red] --index must be exact or faiss (got {index!r})")
        raise typer.Exit(2)
    limits = {"max_k": max_k, "max_body_bytes": max_body_bytes, "max_header_bytes": max_header_bytes,
              "max_headers": max_headers, "read_timeout_s": read_timeout, "max_in_flight": max_in_flight}
    flags = {"max_k": "--max-k", "max_body_bytes": "--max-body-bytes", "max_header_bytes": "--max-header-bytes",
             "max_headers": "--max-headers", "read_timeout_s": "--read-timeout", "max_in_flight": "--max-in-flight"}
    bad = [f"{flags[name]} must be positive (got {value})" for name, value in limits.items() if value <= 0]
    if workers < 1:
        bad.append(f"--workers must be at least 1 (got {workers})")
    if graceful_timeout < 0:
        bad.append(f"--graceful-timeout must be 0 or more (got {graceful_timeout})")
    if bad:
        console.print(f"[red]error:[/red] {'; '.join(bad)}")
        raise typer.Exit(2)
    ServerLimits(**limits)
    spec = ServeSpec(exports=[str(d) for d in out_dirs], data_dir=str(data_dir) if data_dir else None, index=index,
                     threads=threads, limits=limits)
    token = os.environ.get(TOKEN_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/yellow] binding {host}: the API is reachable from other machines"
                      + ("" if token else f"; set {TOKEN_ENV} to require a bearer token"))
    app = None
    if workers == 1:
        from prismrec.serving.export import ExportError

        try:
            app = build_app(spec)
        except (ExportError, ConfigError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        names = ", ".join(f"{e.name} ({e.manifest['model']}, {e.ranker.mode})"
                          for e in app.state.prismrec.exports.values())
    else:  # each worker loads the exports; check them here so a broken one fails before any worker starts
        from prismrec.serving.export import ExportError, verify_checksums

        try:
            manifests = [verify_checksums(d) for d in out_dirs]
        except ExportError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        names = ", ".join(f"{d.name} ({m['model']})" for d, m in zip(out_dirs, manifests, strict=True))
    console.print(f"serving {names} on http://{host}:{port}/ with {workers} worker(s) "
                  f"(token {'required' if token else 'not required'})")
    run(spec, host=host, port=port, workers=workers, access_log=access_log, graceful_timeout_s=graceful_timeout,
        app=app)


@commands.command()
def recommend(
    out_dir: Annotated[Path, typer.Argument(help="an export written by `prismrec export`")],
    users: Annotated[Path, typer.Option("--users", help="CSV with a 'user' column (and optional 'history')")],
    out: Annotated[Path | None, typer.Option("--out", help="output .csv or .parquet (default: beside --users)")] = None,
    k: Annotated[int, typer.Option(help="items per user")] = 10,
    exclude_seen: Annotated[bool, typer.Option(help="never recommend an item of the user's history")] = True,
    batch_size: Annotated[int, typer.Option(help="users scored per matrix product")] = 256,
    skip_unknown: Annotated[bool, typer.Option(help="skip (and list) unknown users instead of stopping")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Top-k for every user of a CSV file, streamed to CSV or Parquet."""
    from prismrec.serving.batch import recommend_file

    (export_,) = _load([out_dir], None, "exact")
    target = out or users.with_name(users.stem + ".recommendations.csv")
    try:
        report = recommend_file(export_, users, target, k=k, exclude_seen=exclude_seen, batch_size=batch_size,
                                skip_unknown=skip_unknown, quiet=quiet)
    except (DataError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for line in report.skipped[:20]:
        console.print(f"[yellow]skipped[/yellow] {users}, {line}")
    if len(report.skipped) > 20:
        console.print(f"[yellow]skipped[/yellow] {len(report.skipped) - 20} more rows")
    console.print(f"{report.users} users, {report.rows} rows -> {report.out}")
