"""``prismrec data ...`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prismrec.data import DATASETS, DataError, SequenceDataset, build_sequences

data_app = typer.Typer(no_args_is_help=True, help="Inspect, download and prepare datasets.")
console = Console()

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="folder holding one sub-folder per dataset (default: $PRISMREC_DATA_DIR, "
                 "then ../shared/data)"),
]

FolderOption = Annotated[
    str | None, typer.Option("--folder", help="dataset folder under the data directory (default: the loader's)"),
]
LoaderOption = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="loader option KEY=VALUE, repeatable (e.g. -o release=2023); "
                 "lists as JSON: -o 'photo_labels=[\"food\"]'"),
]

PAPER_TABLE1 = {
    "movielens-small": (610, 9722, 100808),
    "amazon-games": (26574, 11752, 227774),  # DMESR Table 1, after users < 5 and items < 3 are removed
    "yelp": (31350, 10562, 171835),  # DMESR Table 1, restaurants, after users < 4 and items < 3 are removed
}


@data_app.command("stats")
def stats(
    dataset: Annotated[str, typer.Argument(help="dataset name, e.g. movielens-small")],
    data_dir: DataDirOption = None,
    min_user_interactions: Annotated[int | None, typer.Option(
        help="drop users with fewer interactions (default: the paper's filter for DATASET, else 1)")] = None,
    min_item_interactions: Annotated[int | None, typer.Option(
        help="drop items with fewer interactions (default: the paper's filter for DATASET, else 1)")] = None,
    folder: FolderOption = None,
    option: LoaderOption = None,
) -> None:
    """Print the paper's Table 1 columns for DATASET after filtering."""
    try:
        seqs = _load_filtered(dataset, data_dir, folder, option, min_user_interactions, min_item_interactions)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    s = seqs.stats()
    table = Table(title=f"{dataset} ({seqs.root})")
    for column in ("#users", "#items", "#interactions", "avg. length", "sparsity"):
        table.add_column(column, justify="right")
    table.add_row(f"{s['users']:,}", f"{s['items']:,}", f"{s['interactions']:,}",
                  f"{s['avg_sequence_length']:.2f}", f"{100 * s['sparsity']:.2f}%")
    if dataset in PAPER_TABLE1:
        u, i, n = PAPER_TABLE1[dataset]
        table.add_row(f"paper: {u:,}", f"{i:,}", f"{n:,}", f"{n / u:.2f}", f"{100 * (1 - n / (u * i)):.2f}%")
    console.print(table)
    console.print(f"data fingerprint: {seqs.fingerprint}")


@data_app.command("download")
def download(
    dataset: Annotated[str, typer.Argument(help="movielens-small")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="where to put DATASET/ (created)")],
    url: Annotated[str | None, typer.Option(help="override the source URL (e.g. a mirror)")] = None,
) -> None:
    """Download a dataset's public release into DATA_DIR/DATASET."""
    from prismrec.data.download import GROUPLENS_ML_LATEST_SMALL, download_movielens_small

    if dataset != "movielens-small":
        console.print(f"[red]error:[/red] no public download is known for {dataset!r} (only movielens-small)")
        raise typer.Exit(2)
    try:
        target = download_movielens_small(data_dir, url or GROUPLENS_ML_LATEST_SMALL)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"downloaded to {target}; use it with --data-dir {data_dir}")


# --- loader options, paper filters and image fetching (issue 6) -------------------------------------


def _parse_loader_options(pairs: list[str] | None) -> dict[str, object]:
    """``["release=2023", "photo_labels=[\"food\"]"]`` -> dict; pydantic validates and coerces the values."""
    import json

    options: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--option expects KEY=VALUE, got {pair!r}")
        value = value.strip()
        parsed: object = value
        if value[:1] in "[{":
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise DataError(f"--option {key}: not valid JSON: {exc}") from None
        elif value.lower() in ("none", "null"):
            parsed = None
        options[key.strip()] = parsed
    return options


def _load_filtered(dataset: str, data_dir: Path | None, folder: str | None, option: list[str] | None,
                   min_user: int | None, min_item: int | None) -> SequenceDataset:
    """Load DATASET with its options, apply the paper's filter unless thresholds are given, print the report."""
    from pydantic import ValidationError

    from prismrec.data.generic import paper_filter_of
    from prismrec.data.paths import resolve_dataset_root
    from prismrec.registry import UnknownComponentError

    try:
        loader_cls = DATASETS.get(dataset)
    except UnknownComponentError as exc:
        raise DataError(str(exc)) from None
    try:
        options = loader_cls.Options.model_validate(_parse_loader_options(option))
    except ValidationError as exc:
        raise DataError(f"bad loader option(s) for {dataset!r}:\n{exc}") from None
    default = paper_filter_of(loader_cls)
    min_user = default.min_user_interactions if min_user is None else min_user
    min_item = default.min_item_interactions if min_item is None else min_item
    root = resolve_dataset_root(folder or loader_cls.folder, data_dir)
    loader = loader_cls(options)
    raw = loader.load(root)
    for line in getattr(getattr(loader, "report", None), "lines", lambda: [])():
        console.print(f"[dim]{line}[/dim]")
    console.print(f"filter: users with < {min_user} and items with < {min_item} interactions removed")
    return build_sequences(raw, min_user, min_item)


@data_app.command("fetch-images")
def fetch_images_command(
    dataset: Annotated[str, typer.Argument(help="dataset name, e.g. amazon-games")],
    data_dir: DataDirOption = None,
    folder: FolderOption = None,
    option: LoaderOption = None,
    all_items: Annotated[bool, typer.Option("--all-items", help="every catalogue item, not only those left "
                                            "after the filter")] = False,
    min_user_interactions: Annotated[int | None, typer.Option(help="as for `data stats`")] = None,
    min_item_interactions: Annotated[int | None, typer.Option(help="as for `data stats`")] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight in total")] = 16,
    per_host: Annotated[int, typer.Option(help="requests in flight per host")] = 4,
    timeout: Annotated[float, typer.Option(help="seconds for one whole request")] = 20.0,
    retries: Annotated[int, typer.Option(help="extra attempts after timeouts, connection errors, 429, 5xx")] = 3,
    max_mb: Annotated[float, typer.Option(help="refuse images larger than this many MB")] = 10.0,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="ask again for URLs that failed "
                                               "permanently in an earlier run")] = False,
) -> None:
    """Download DATASET's item images given as http/https URLs into the resumable image cache.

    The cache is $PRISMREC_HOME/cache/images; loaders find fetched images there by URL.
    """
    import json

    from pydantic import ValidationError

    from prismrec.data.images import FetchOptions, ImageCache, fetch_images
    from prismrec.data.paths import output_dir

    try:
        fetch_options = FetchOptions(concurrency=concurrency, per_host=per_host, timeout_s=timeout, retries=retries,
                                     max_bytes=int(max_mb * 1_000_000), retry_failed=retry_failed)
        if all_items:
            from prismrec.data import load_raw
            from prismrec.registry import UnknownComponentError

            try:
                catalogue = load_raw(dataset, data_dir, _parse_loader_options(option), folder).items
            except UnknownComponentError as exc:
                raise DataError(str(exc)) from None
        else:
            catalogue = _load_filtered(dataset, data_dir, folder, option, min_user_interactions,
                                       min_item_interactions).items
    except (DataError, ValidationError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if "image_url" not in catalogue.columns:
        console.print(f"{dataset}: the catalogue has no image URLs (its images are local files); nothing to fetch")
        return
    urls = [u for u in catalogue["image_url"] if isinstance(u, str) and u]
    console.print(f"{dataset}: {len(catalogue):,} items, {len(urls):,} with an image URL")
    cache = ImageCache()
    report = fetch_images(urls, cache, fetch_options)
    summary = report.to_json()
    console.print(f"fetched {summary['fetched']:,}, already cached {summary['cached']:,}, "
                  f"failed {summary['failed']:,}, skipped (failed before) {summary['skipped_failed_before']:,}")
    for reason, count in report.reasons().most_common(10):
        console.print(f"  {count:,} x {reason}")
    if report.failures():
        path = output_dir("reports") / f"fetch-images-{dataset}.json"
        path.write_text(json.dumps(summary, indent=1), "utf-8")
        console.print(f"failure report: {path}")
    console.print(f"cache: {cache.directory}")
