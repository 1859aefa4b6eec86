"""``prismrec derive ...`` and ``prismrec semantics status|show ...`` commands."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from prismrec.data import DataError
from prismrec.data.paths import output_dir
from prismrec.registry import UnknownComponentError
from prismrec.semantics import (
    BACKENDS,
    EMBEDDERS,
    ROUTES,
    Backend,
    DeriveOptions,
    Deriver,
    DeriveReport,
    Embedder,
    HybridMode,
    Route,
)
from prismrec.semantics.cache import ItemResult, SemanticCache
from prismrec.semantics.derive import default_cache_path, load_items
from prismrec.semantics.types import ItemRecord, failure_kind

commands = typer.Typer()  # merged into the top level by prismrec.cli.app

console = Console()
err_console = Console(stderr=True)

semantics_app = typer.Typer(no_args_is_help=True, help="Inspect derived item semantics.")

CacheOption = Annotated[Path | None, typer.Option("--cache", help="SQLite cache file (default: "
                                                  "$PRISMREC_HOME/cache/semantics.sqlite)")]


def build_options(model_cls: type[BaseModel], what: str, given: dict[str, object]) -> BaseModel:
    """Validate the CLI values that were given against a component's options model.

    A given value the component does not take is an error naming the flag, not silently ignored.
    """
    provided = {field: value for field, value in given.items() if value is not None}
    fields = model_cls.model_fields
    unknown = [field for field in provided if field not in fields]
    if unknown:
        flags = ", ".join("--" + f.removesuffix("_s").replace("_", "-").replace("base-urls", "base-url")
                          for f in unknown)
        raise typer.BadParameter(f"{flags} does not apply to {what}")
    return model_cls(**provided)


@commands.command("derive")
def derive(
    dataset: Annotated[str, typer.Argument(help="dataset name, e.g. movielens-small")],
    backend: Annotated[str, typer.Option(help=f"generation backend: {', '.join(BACKENDS.names())}")] = "describe",
    base_url: Annotated[list[str] | None, typer.Option(help="openai: server /v1 URL; repeat to fan out")] = None,
    model: Annotated[str | None, typer.Option(help="openai: model name; transformers/local-llm: model "
                                              "folder or file")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="openai: environment variable with the API key")] = None,
    concurrency: Annotated[int | None, typer.Option(help="openai: requests in flight per base URL")] = None,
    timeout: Annotated[float | None, typer.Option(help="openai: per-request timeout (s)")] = None,
    max_retries: Annotated[int | None, typer.Option(help="openai: retries per request")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    max_tokens: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    image_input: Annotated[str | None, typer.Option(help="openai: images on the visual and hybrid routes: auto "
                                                    "(default: attach until the server refuses, then the poster "
                                                    "analysis text), attached, analysis, none")] = None,
    batch_size: Annotated[int | None, typer.Option(help="items per backend call (local backends)")] = None,
    device: Annotated[str | None, typer.Option(help="transformers/local-llm: cpu or cuda")] = None,
    embedder: Annotated[str, typer.Option(help=f"text embedder: {', '.join(EMBEDDERS.names())}")] = (
        "sentence-transformers"),
    embedder_model: Annotated[str | None, typer.Option(help="embedder model (folder or API name)")] = None,
    embedder_base_url: Annotated[list[str] | None, typer.Option(help="openai embedder: server /v1 URL")] = None,
    embedder_api_key_env: Annotated[str | None, typer.Option()] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="L2-normalise rows")] = False,
    hybrid_mode: Annotated[HybridMode, typer.Option(help="single_prompt: the paper's prompt; multi_turn: "
                                                    "refinement turns until the text settles")] = (
        HybridMode.SINGLE_PROMPT),
    max_rounds: Annotated[int, typer.Option(help="multi_turn: refinement turns at most")] = 3,
    limit: Annotated[int | None, typer.Option(help="only the first N items in id order")] = None,
    name: Annotated[str | None, typer.Option(help="artefact name (default: from dataset and backend)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding one sub-folder per dataset")] = None,
    cache: CacheOption = None,
    allow_fallback: Annotated[str | None, typer.Option(help="'original': embed failed items' original text "
                                                       "instead of failing")] = None,
    with_xreflect: Annotated[bool, typer.Option("--with-xreflect", help="also run the X-REFLECT cross-reflection "
                                                "prompt and write an 'xreflect' matrix")] = False,
    min_user_interactions: Annotated[int, typer.Option(min=1, help="k-core filter; must match the training "
                                                       "config's data section (rows follow internal item ids)")] = 1,
    min_item_interactions: Annotated[int, typer.Option(min=1, help="k-core filter (as above)")] = 1,
) -> None:
    """Derive item semantics for DATASET (DMESR three-way prompting) and write semantics/NAME/.

    The default backend, ``describe``, uses no MLLM (docs/semantics.md); the paper's setup is
    ``--backend openai --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-3B-Instruct``.
    """
    try:
        backend_cls = BACKENDS.get(backend)
        embedder_cls = EMBEDDERS.get(embedder)
        backend_options = build_options(backend_cls.Options, f"backend {backend!r}", {
            "base_urls": base_url, "model": model, "api_key_env": api_key_env, "concurrency": concurrency,
            "timeout_s": timeout, "max_retries": max_retries, "temperature": temperature,
            "max_tokens": max_tokens, "seed": seed, "batch_size": batch_size, "device": device,
            "image_input": image_input,
        })
        embedder_options = build_options(embedder_cls.Options, f"embedder {embedder!r}", {
            "model": embedder_model, "base_urls": embedder_base_url, "api_key_env": embedder_api_key_env,
        })
        options = DeriveOptions(dataset=dataset, data_dir=data_dir, name=name, limit=limit, hybrid_mode=hybrid_mode,
                                max_rounds=max_rounds, normalize=normalize, allow_fallback=allow_fallback,
                                xreflect=with_xreflect, min_user_interactions=min_user_interactions,
                                min_item_interactions=min_item_interactions)
    except (UnknownComponentError, ValidationError, typer.BadParameter) as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None

    try:
        items, facts = load_items(options)
    except DataError as error:
        err_console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None

    with SemanticCache(cache or default_cache_path()) as store:
        try:
            backend_instance = backend_cls(backend_options, store)
            embedder_instance = embedder_cls(embedder_options)
        except (FileNotFoundError, ImportError) as error:
            err_console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from None
        report = asyncio.run(_derive(options, backend_instance, embedder_instance, store, items, facts))
    _print_report(report)
    if report.failures and options.allow_fallback is None:
        raise typer.Exit(1)


async def _derive(options: DeriveOptions, backend: Backend, embedder: Embedder, store: SemanticCache,
                  items: list[ItemRecord], facts: dict) -> DeriveReport:
    try:
        return await Deriver(options, backend, embedder, store, console=err_console).run(items, facts)
    finally:
        await backend.aclose()
        await embedder.aclose()


def _print_report(report: DeriveReport) -> None:
    table = Table(title=f"derivation {report.name}: {report.n_items:,} items")
    for column in ("route", "ok", "failed", "textual-prompt fallback (no / unreadable / no images sent)"):
        table.add_column(column, justify="right")
    for route, counts in report.counts.items():
        no_image = (counts["fallback_no_image"] + counts["fallback_unreadable_image"]
                    + counts["fallback_image_input_none"])
        table.add_row(route, f"{counts['ok']:,}", f"{counts['failed']:,}", f"{no_image:,}")
    console.print(table)
    timing = ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())
    console.print(f"model calls: {report.model_calls:,}; posters analysed: {report.images_analysed:,}; "
                  f"embedding calls: {report.embed_calls:,}; {report.elapsed_s:.1f}s ({timing})")
    if report.failures:
        failed = Table(title=f"{len(report.failures)} failed (route, item): never embedded")
        for column in ("route", "item", "external id", "failure", "reason"):
            failed.add_column(column)
        for result in report.failures[:50]:
            kind, reason = failure_kind(result.error)
            failed.add_row(result.route, str(result.item_id), result.external_id, kind, reason)
        if len(report.failures) > 50:
            failed.add_row("...", "", "", "", f"{len(report.failures) - 50} more (prismrec semantics status)")
        console.print(failed)
        kinds = Counter(failure_kind(r.error)[0] for r in report.failures)
        console.print("failures: " + ", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common()))
        if any("image_unsupported" in (r.error or "") for r in report.failures):
            console.print("[yellow]the server refuses images[/yellow]: rerun with --image-input analysis (the poster "
                          "analysis text) or --image-input none (textual prompt only), or serve a vision model")
    if report.written:
        console.print(f"artefact: {report.out_dir}")
    elif report.failures:
        console.print("[red]no artefact written[/red]: rerun to retry the failed items (finished answers are "
                      "cached), or pass --allow-fallback original to embed their original text instead")


def _routes_of(results: list[ItemResult]) -> tuple[Route, ...]:
    """DMESR's three routes, plus X-REFLECT when the derivation ran it."""
    return (*ROUTES, Route.XREFLECT) if any(r.route == Route.XREFLECT.value for r in results) else ROUTES


@semantics_app.command("status")
def status(name: Annotated[str, typer.Argument(help="derivation name")], cache: CacheOption = None) -> None:
    """Done / failed / left per route, and tokens used, for derivation NAME."""
    with SemanticCache(cache or default_cache_path()) as store:
        info = store.derivation(name)
        if info is None:
            known = ", ".join(store.derivation_names()) or "(none)"
            err_console.print(f"[red]error:[/red] no derivation {name!r} in {store.path}; known: {known}")
            raise typer.Exit(2)
        results = store.item_results(name)
        runs = store.runs(name)
    n = info["n_items"]
    table = Table(title=f"{name}: {info['dataset']}, {n:,} items, backend {info['config']['backend']['backend']} "
                        f"({info['config']['backend']['model']})")
    for column in ("route", "done", "failed", "left", "no-image fallback", "prompt tokens", "completion tokens"):
        table.add_column(column, justify="right")
    for route in _routes_of(results):
        rows = [r for r in results if r.route == route.value]
        done = sum(r.status == "ok" for r in rows)
        failed = sum(r.status == "failed" for r in rows)
        table.add_row(route.value, f"{done:,}", f"{failed:,}", f"{max(n - done - failed, 0):,}",
                      f"{sum(r.fallback is not None for r in rows):,}", f"{sum(r.prompt_tokens for r in rows):,}",
                      f"{sum(r.completion_tokens for r in rows):,}")
    console.print(table)
    if runs:
        wall = sum(r["wall_s"] for r in runs)
        calls = sum(r["model_calls"] for r in runs)
        fresh_prompt = sum(r["prompt_tokens"] for r in runs)
        fresh_completion = sum(r["completion_tokens"] for r in runs)
        rate = f", {fresh_completion / wall:.1f} completion tokens/s" if wall > 0 and fresh_completion else ""
        console.print(f"{len(runs)} run(s): wall time {wall:,.1f} s, {calls:,} model calls, {fresh_prompt:,} prompt + "
                      f"{fresh_completion:,} completion tokens answered by the model (cache hits excluded){rate}")
    else:
        console.print("no finished run recorded yet (a killed run records none; its answers are cached)")
    failures = [r for r in results if r.status == "failed"]
    for result in failures[:20]:
        kind, reason = failure_kind(result.error)
        console.print(f"  failed {result.route} item {result.item_id} ({result.external_id}) [{kind}]: {reason}")


@semantics_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="derivation name")],
    item_id: Annotated[str, typer.Argument(help="internal item id (1..n), or the dataset's id with --external")],
    external: Annotated[bool, typer.Option("--external", help="ITEM_ID is the dataset's own item id")] = False,
    cache: CacheOption = None,
) -> None:
    """Print the original text and the three descriptions of one item."""
    with SemanticCache(cache or default_cache_path()) as store:
        if store.derivation(name) is None:
            err_console.print(f"[red]error:[/red] no derivation {name!r} in {store.path}")
            raise typer.Exit(2)
        results = store.item_results(name)
    if external:
        matching = [r for r in results if r.external_id == item_id]
    else:
        if not item_id.isdigit():
            err_console.print(f"[red]error:[/red] ITEM_ID {item_id!r} is not an internal id; use --external")
            raise typer.Exit(2)
        matching = [r for r in results if r.item_id == int(item_id)]
    if not matching:
        err_console.print(f"[red]error:[/red] derivation {name!r} has no result for item {item_id!r}")
        raise typer.Exit(2)
    first = matching[0]
    console.print(f"[bold]item {first.item_id}[/bold] (dataset id {first.external_id})")
    descriptions = output_dir("semantics") / name / "descriptions.parquet"
    if descriptions.exists():
        table = pd.read_parquet(descriptions, columns=["item_id", "original"])
        original = table.loc[table["item_id"] == first.item_id, "original"]
        if len(original):
            console.rule("original")
            console.print(str(original.iloc[0]))
    for route in _routes_of(matching):
        result = next((r for r in matching if r.route == route.value), None)
        console.rule(route.value)
        if result is None:
            console.print("(not derived yet)")
        elif result.status != "ok":
            console.print(f"[red]failed[/red]: {result.error}")
        else:
            notes = [f"template {result.template}"]
            if result.fallback:
                notes.append(f"fallback: {result.fallback}")
            if result.rounds:
                notes.append(f"refinement rounds: {result.rounds}")
            console.print(f"[dim]{'; '.join(notes)}[/dim]")
            console.print(result.text)
