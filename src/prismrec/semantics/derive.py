"""The derivation engine: three-way prompting over a catalogue, cached, resumable, then embedded and written.

Flow for one named derivation:

1. Load the catalogue (``prismrec.data.load_sequences``: internal id order), hash each poster's bytes.
2. For backends that read images as text (``describe``, ``local-llm``), analyse every poster once
   (EfficientNet-Lite0 + colours, cached per image hash).
3. For each route (textual, visual, hybrid) build each item's request from the versioned templates, look
   it up in the generation cache, send the misses to the backend (``concurrency`` batches of
   ``batch_size`` in flight) and commit each answer as it arrives. Items without an image use the
   textual prompt on the visual and hybrid routes (recorded as ``fallback = no_image``). Hybrid runs
   either as the paper's single prompt, or as our multi-turn loop (initial answer, then refinement
   turns until the text stops changing materially or ``max_rounds`` is reached). With ``xreflect=True``
   (CLI ``--with-xreflect``) a fourth route runs the X-REFLECT cross-reflection prompt (template
   ``xreflect``, text + image) per item, cached and recorded like the others.
4. Failures (after the backend's retries) are recorded per item and never embedded: without
   ``allow_fallback="original"`` the run stops before writing the artefact and reports them.
5. Embed every description and every item's original text (cached per text hash), and write
   ``semantics/<name>/``: ``embeddings.safetensors`` (float32 ``text``, ``visual``, ``hybrid``,
   ``original``, ``xreflect`` when that route ran and, where posters were analysed, ``image``; row 0 =
   padding (zeros), row i = internal item id i),
   ``items.json`` and ``descriptions.parquet``; each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from safetensors.numpy import save_file

from prismrec.data import load_sequences
from prismrec.data.paths import output_dir
from prismrec.semantics.backends.base import Backend, answer_problem
from prismrec.semantics.cache import ItemResult, SemanticCache
from prismrec.semantics.embedders.base import Embedder
from prismrec.semantics.image_analysis import ImageAnalyser, render_analysis
from prismrec.semantics.prompts import (
    ATTACHED_IMAGE_REFERENCE,
    DMESR_HYBRID,
    DMESR_TEXTUAL,
    DMESR_VISUAL,
    HYBRID_INITIAL,
    HYBRID_REFINE,
    ROUTES,
    XREFLECT,
    PromptTemplate,
    Route,
    analysis_reference,
    render_attributes,
)
from prismrec.semantics.types import (
    ChatMessage,
    Generation,
    GenerationFailure,
    GenerationRequest,
    GenerationResult,
    ItemRecord,
    sha256_file,
    sha256_text,
    stable_hash,
)

ARTEFACT_FORMAT = "prismrec-semantics/1"
# Permanent failures that belong to the request itself (its cache key covers model, prompt and parameters), so a
# rerun would get them again: kept in the cache and not asked again. Others are the server's (a context size,
# a refused image, an API key) and are asked again after the user changes the server.
REMEMBERED_FAILURES = frozenset({"truncated"})


class HybridMode(StrEnum):
    SINGLE_PROMPT = "single_prompt"  # the paper's hybrid prompt; the model iterates internally
    MULTI_TURN = "multi_turn"  # our loop: initial answer, then refinement turns until the text settles


class DeriveOptions(BaseModel):
    """What to derive and how; the backend and embedder bring their own options."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    data_dir: Path | None = None
    name: str | None = Field(None, description="artefact name (default: derived from dataset and backend)")
    limit: int | None = Field(None, ge=1, description="only the first N items in id order")
    hybrid_mode: HybridMode = HybridMode.SINGLE_PROMPT
    max_rounds: int = Field(3, ge=0, le=10, description="multi_turn: refinement turns at most")
    settle_ratio: float = Field(0.95, gt=0, le=1, description="multi_turn: stop when the new text is at least "
                                "this similar (difflib ratio) to the previous one")
    normalize: bool = Field(False, description="L2-normalise every embedding row (recorded in items.json)")
    allow_fallback: str | None = Field(None, pattern="^original$", description="'original': embed failed items' "
                                       "original text instead of failing the run (recorded per item)")
    xreflect: bool = Field(False, description="also run the X-REFLECT cross-reflection prompt per item and write "
                           "an 'xreflect' matrix (read by the xreflect baseline)")
    min_user_interactions: int = Field(1, ge=1)
    min_item_interactions: int = Field(1, ge=1)


@dataclass
class DeriveReport:
    name: str
    out_dir: Path
    n_items: int
    counts: dict[str, Counter] = field(default_factory=dict)
    failures: list[ItemResult] = field(default_factory=list)
    model_calls: int = 0
    embed_calls: int = 0
    images_analysed: int = 0
    written: bool = False
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def default_name(dataset: str, backend: Backend, limit: int | None) -> str:
    parts = [dataset, backend.backend_name]
    if backend.backend_name != "describe":
        parts.append(re.sub(r"[^a-z0-9.]+", "-", backend.model.lower().rsplit("/", 1)[-1]).strip("-"))
    if limit is not None:
        parts.append(f"limit{limit}")
    return "-".join(p for p in parts if p)


def default_cache_path() -> Path:
    return output_dir("cache") / "semantics.sqlite"


def load_items(options: DeriveOptions) -> tuple[list[ItemRecord], dict]:
    """Catalogue items in internal id order (limited), with image content hashes, and dataset facts."""
    seqs = load_sequences(options.dataset, options.data_dir, min_user_interactions=options.min_user_interactions,
                          min_item_interactions=options.min_item_interactions)
    n = seqs.n_items if options.limit is None else min(options.limit, seqs.n_items)
    items: list[ItemRecord] = []
    for item_id in range(1, n + 1):
        image = seqs.image_path(item_id)
        items.append(ItemRecord(
            item_id=item_id,
            external_id=str(seqs.item_ids[item_id]),
            attributes=seqs.item_attributes(item_id),
            image_path=image,
            image_sha=sha256_file(image) if image is not None else None,
        ))
    facts = {"dataset": seqs.name, "root": str(seqs.root), "fingerprint": seqs.fingerprint,
             "catalogue_items": seqs.n_items}
    return items, facts


@dataclass
class _RouteOutcome:
    text: str | None
    error: str | None
    rounds: int
    prompt_tokens: int
    completion_tokens: int


class Deriver:
    """Runs one derivation; see the module docstring."""

    def __init__(self, options: DeriveOptions, backend: Backend, embedder: Embedder, cache: SemanticCache,
                 console: Console | None = None) -> None:
        self.options = options
        self.backend = backend
        self.embedder = embedder
        self.cache = cache
        self.console = console or Console(stderr=True)
        self.analyser: ImageAnalyser = getattr(backend, "analyser", None) or ImageAnalyser(cache)
        self._analyses: dict[str, tuple[dict, np.ndarray]] = {}
        self._in_flight: dict[str, asyncio.Future[GenerationResult]] = {}
        #: tokens of the answers this run received from the model (cache hits excluded)
        self.fresh_prompt_tokens = 0
        self.fresh_completion_tokens = 0

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes this derivation runs: DMESR's three, plus X-REFLECT when asked for."""
        return (*ROUTES, Route.XREFLECT) if self.options.xreflect else ROUTES

    # --- requests ------------------------------------------------------------------------------------
    def _image_reference(self, item: ItemRecord) -> tuple[str, Path | None]:
        """The text that replaces ``{image_path}`` and the image to attach (if the backend takes images)."""
        assert item.image_path is not None and item.image_sha is not None
        mode = self.backend.image_input
        if mode == "attached":
            return ATTACHED_IMAGE_REFERENCE, item.image_path
        if mode == "analysis":
            return analysis_reference(render_analysis(self._analyses[item.image_sha][0])), None
        return str(item.image_path), None

    def _request(self, item: ItemRecord, route: Route, template: PromptTemplate, text: str,
                 image: Path | None) -> GenerationRequest:
        message = ChatMessage("user", text, image=image,
                              image_sha=item.image_sha if template.modality != "text" else None)
        return GenerationRequest(item=item, route=route, template_key=template.key, modality=template.modality,
                                 messages=(message,))

    def initial_request(self, item: ItemRecord, route: Route) -> tuple[GenerationRequest, str | None]:
        """The first request for (item, route), and the fallback taken (``"no_image"``) if any."""
        attributes = render_attributes(item.attributes)
        textual = self._request(item, route, DMESR_TEXTUAL, DMESR_TEXTUAL.render(attributes=attributes), None)
        if route == Route.TEXTUAL:
            return textual, None
        if item.image_path is None or item.image_sha is None:
            return textual, "no_image"
        if self.backend.image_input == "none":
            return textual, "image_input_none"
        if self.backend.image_input == "analysis" and item.image_sha not in self._analyses:
            return textual, "unreadable_image"
        reference, image = self._image_reference(item)
        if route == Route.VISUAL:
            return self._request(item, route, DMESR_VISUAL, DMESR_VISUAL.render(image_path=reference), image), None
        if route == Route.XREFLECT:
            return self._request(item, route, XREFLECT, XREFLECT.render(text_info=attributes, image_path=reference),
                                 image), None
        template = DMESR_HYBRID if self.options.hybrid_mode == HybridMode.SINGLE_PROMPT else HYBRID_INITIAL
        return self._request(item, route, template, template.render(text_info=attributes, image_path=reference),
                             image), None

    @staticmethod
    def refinement_request(previous: GenerationRequest, answer: str, turn: int) -> GenerationRequest:
        messages = (*previous.messages, ChatMessage("assistant", answer), ChatMessage("user", HYBRID_REFINE.text))
        return GenerationRequest(item=previous.item, route=previous.route, template_key=HYBRID_REFINE.key,
                                 modality=previous.modality, messages=messages, turn=turn)

    def cache_key(self, request: GenerationRequest) -> str:
        return stable_hash({
            "backend": self.backend.backend_name,
            "model": self.backend.model,
            "template": request.template_key,
            "messages": request.cache_material(),
            "params": self.backend.generation_params(),
        })

    # --- generation with the cache -------------------------------------------------------------------
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answers from the cache, else from the backend (committed one by one).

        A request identical to one already in flight (e.g. a poster-less item's visual route reusing its
        textual prompt, or two items sharing text and poster) waits for that answer instead of asking again.
        """
        keys = [self.cache_key(r) for r in requests]
        results: list[GenerationResult | None] = [self.cache.get_generation(k) or self._known_failure(k) for k in keys]
        waiting: list[tuple[int, asyncio.Future[GenerationResult]]] = []
        misses: list[int] = []
        for i, key in enumerate(keys):
            if results[i] is not None:
                continue
            if key in self._in_flight:
                waiting.append((i, self._in_flight[key]))
            else:
                self._in_flight[key] = asyncio.get_running_loop().create_future()
                misses.append(i)
        try:
            answers = await self.backend.generate_batch([requests[i] for i in misses]) if misses else []
        except BaseException as error:
            for i in misses:
                future = self._in_flight.pop(keys[i])
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # mark retrieved: the caller sees the error itself
            raise
        for i, answer in zip(misses, answers, strict=True):
            if isinstance(answer, Generation):
                problem = answer_problem(answer.text, answer.finish_reason)
                if problem is not None:
                    answer = GenerationFailure(problem)
                else:
                    request = requests[i]
                    self.fresh_prompt_tokens += answer.prompt_tokens
                    self.fresh_completion_tokens += answer.completion_tokens
                    self.cache.put_generation(keys[i], backend=self.backend.backend_name, model=self.backend.model,
                                              template=request.template_key, route=request.route.value,
                                              item=request.item.external_id, turn=request.turn, generation=answer)
            if isinstance(answer, GenerationFailure) and answer.permanent and answer.kind in REMEMBERED_FAILURES:
                self.cache.put_failed_request(keys[i], answer.kind, answer.reason)
            results[i] = answer
            self._in_flight.pop(keys[i]).set_result(answer)
        for i, future in waiting:
            results[i] = await future
        return [r for r in results if r is not None]

    def _known_failure(self, key: str) -> GenerationFailure | None:
        known = self.cache.get_failed_request(key)
        if known is None:
            return None
        kind, reason = known
        return GenerationFailure(f"{reason} (in an earlier run; not asked again)", 0, permanent=True, kind=kind)

    async def _process_chunk(self, route: Route, chunk: list[ItemRecord]) -> list[tuple[ItemRecord, str | None,
                                                                                          str, _RouteOutcome]]:
        built = [self.initial_request(item, route) for item in chunk]
        requests = [r for r, _ in built]
        results = await self.generate(requests)
        outcomes: list[_RouteOutcome] = []
        for result in results:
            if isinstance(result, Generation):
                outcomes.append(_RouteOutcome(result.text, None, 0, result.prompt_tokens, result.completion_tokens))
            else:
                outcomes.append(_RouteOutcome(None, result.describe(), 0, 0, 0))
        templates = [r.template_key for r in requests]
        refine = (route == Route.HYBRID and self.options.hybrid_mode == HybridMode.MULTI_TURN
                  and self.backend.iterates_internally)
        if refine:
            active = [i for i, (r, fallback) in enumerate(built) if fallback is None and outcomes[i].text is not None]
            current = {i: requests[i] for i in active}
            for i in active:
                templates[i] = f"{templates[i]}+{HYBRID_REFINE.key}"
            for turn in range(1, self.options.max_rounds + 1):
                if not active:
                    break
                asks = [self.refinement_request(current[i], outcomes[i].text or "", turn) for i in active]
                answers = await self.generate(asks)
                still: list[int] = []
                for i, ask, answer in zip(active, asks, answers, strict=True):
                    outcome = outcomes[i]
                    if isinstance(answer, GenerationFailure):
                        outcome.error = f"refinement turn {turn}: {answer.describe()}"
                        outcome.text = None
                        continue
                    outcome.rounds = turn
                    outcome.prompt_tokens += answer.prompt_tokens
                    outcome.completion_tokens += answer.completion_tokens
                    settled = difflib.SequenceMatcher(None, outcome.text or "", answer.text).ratio()
                    outcome.text = answer.text
                    current[i] = ask
                    if settled < self.options.settle_ratio:
                        still.append(i)
                active = still
        return [(item, fallback, template, outcome)
                for item, (_, fallback), template, outcome in zip(chunk, built, templates, outcomes, strict=True)]

    async def run_routes(self, name: str, routes: tuple[Route, ...], items: list[ItemRecord],
                         progress: Progress) -> None:
        """All routes through one pool of ``concurrency`` workers, route after route with no barrier between
        them (the tail of one route overlaps the start of the next), each result committed as it arrives."""
        tasks = {route: progress.add_task(f"{route.value:>8}", total=len(items)) for route in routes}
        size = max(1, self.backend.batch_size)
        chunks: asyncio.Queue[tuple[Route, list[ItemRecord]]] = asyncio.Queue()
        for route in routes:
            for start in range(0, len(items), size):
                chunks.put_nowait((route, items[start:start + size]))

        async def worker() -> None:
            while True:
                try:
                    route, chunk = chunks.get_nowait()
                except asyncio.QueueEmpty:
                    return
                self.cache.put_item_results(name, [ItemResult(
                    route=route.value, item_id=item.item_id, external_id=item.external_id,
                    status="ok" if outcome.text is not None else "failed", text=outcome.text,
                    fallback=fallback, rounds=outcome.rounds, template=template, error=outcome.error,
                    prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                ) for item, fallback, template, outcome in await self._process_chunk(route, chunk)])
                progress.advance(tasks[route], len(chunk))

        workers = [asyncio.create_task(worker()) for _ in range(max(1, self.backend.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def run(self, items: list[ItemRecord] | None = None, facts: dict | None = None) -> DeriveReport:
        started = time.perf_counter()
        if items is None or facts is None:
            items, facts = load_items(self.options)
        name = self.options.name or default_name(self.options.dataset, self.backend, self.options.limit)
        out_dir = output_dir("semantics") / name
        report = DeriveReport(name=name, out_dir=out_dir, n_items=len(items))
        self.cache.start_derivation(name, facts["dataset"], len(items), self.public_config(facts))
        timings: dict[str, float] = {}

        if self.backend.probe_images:
            await self.settle_image_input(items)
        with _RateProgress(self.console) as progress:
            if self.backend.image_input == "analysis":
                t0 = time.perf_counter()
                images = {i.image_sha: i.image_path for i in items if i.image_sha and i.image_path}
                task = progress.add_task("  images", total=len(images))
                self._analyses = await asyncio.to_thread(
                    self.analyser.analyse, images, lambda n: progress.advance(task, n))
                progress.update(task, completed=len(images))
                timings["image_analysis_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            await self.run_routes(name, self.routes, items, progress)
            timings["generation_s"] = time.perf_counter() - t0

        results = {route: {r.item_id: r for r in self.cache.item_results(name, route.value)} for route in self.routes}
        wanted = {item.item_id for item in items}
        for route in self.routes:
            rows = [r for k, r in results[route].items() if k in wanted]
            report.counts[route.value] = Counter(
                {"ok": sum(r.status == "ok" for r in rows), "failed": sum(r.status == "failed" for r in rows),
                 "fallback_no_image": sum(r.fallback == "no_image" for r in rows),
                 "fallback_unreadable_image": sum(r.fallback == "unreadable_image" for r in rows),
                 "fallback_image_input_none": sum(r.fallback == "image_input_none" for r in rows)})
            report.failures.extend(r for r in rows if r.status == "failed")
        report.model_calls = self.backend.calls
        report.images_analysed = self.analyser.images_analysed
        if report.failures and self.options.allow_fallback is None:
            report.elapsed_s = time.perf_counter() - started
            report.timings = timings
            self._record_run(name, report)
            return report

        t0 = time.perf_counter()
        vectors = await self.embed_all(items, results)
        timings["embedding_s"] = time.perf_counter() - t0
        report.embed_calls = self.embedder.calls
        self.write_artefact(out_dir, name, items, facts, results, vectors, report)
        report.written = True
        report.elapsed_s = time.perf_counter() - started
        report.timings = timings
        self._record_run(name, report)
        return report

    def _record_run(self, name: str, report: DeriveReport) -> None:
        """What this run cost (wall time, model calls, fresh tokens), for ``prismrec semantics status``."""
        self.cache.record_run(name, wall_s=report.elapsed_s, model_calls=report.model_calls,
                              prompt_tokens=self.fresh_prompt_tokens, completion_tokens=self.fresh_completion_tokens,
                              written=report.written)

    async def settle_image_input(self, items: list[ItemRecord]) -> None:
        """``image_input = auto``: find out whether the server takes images, before sending many.

        One image request goes first (the first poster's visual prompt; answered from the cache when an earlier
        run asked it). If the server answers that it does not take images, the rest of the run sends the poster
        analysis text instead, and the verdict is kept in the cache for this server and model so that a rerun
        asks nothing again. Any other outcome (an answer, or a failure of another kind) keeps images attached.
        """
        note = f"image_input:{self.backend.capability_key()}"
        if self.cache.get_note(note) == "unsupported":
            self.backend.use_image_input("analysis")
            self.console.print("[yellow]images:[/yellow] this server and model refused images in an earlier run: "
                               "sending the poster analysis text instead (--image-input attached tries images "
                               "again, --image-input none skips them)")
            return
        probe = next((item for item in items if item.image_path is not None and item.image_sha is not None), None)
        if probe is None:
            self.backend.use_image_input("attached")
            return
        request, _ = self.initial_request(probe, Route.VISUAL)
        [answer] = await self.generate([request])
        if isinstance(answer, GenerationFailure) and answer.kind == "image_unsupported":
            self.cache.put_note(note, "unsupported")
            self.backend.use_image_input("analysis")
            self.console.print(f"[yellow]images:[/yellow] the server does not take images ({answer.reason[:200]}); "
                               "sending the poster analysis text instead for this run (that is --image-input "
                               "analysis; --image-input none skips images, --image-input attached insists)")
        else:
            self.backend.use_image_input("attached")

    def public_config(self, facts: dict) -> dict:
        return {
            "dataset": facts["dataset"],
            "data_fingerprint": facts["fingerprint"],
            "limit": self.options.limit,
            "backend": self.backend.public_config(),
            "embedder": self.embedder.public_config(),
            "hybrid_mode": self.options.hybrid_mode.value,
            "max_rounds": self.options.max_rounds,
            "normalize": self.options.normalize,
            "allow_fallback": self.options.allow_fallback,
            "xreflect": self.options.xreflect,
        }

    async def embed_all(self, items: list[ItemRecord], results: dict[Route, dict[int, ItemResult]]
                        ) -> dict[str, np.ndarray]:
        """sha256(text) -> vector for every description and original text (cache first, then the embedder)."""
        texts: dict[str, str] = {}
        for item in items:
            texts[sha256_text(item.original_text)] = item.original_text
            for route in self.routes:
                result = results[route].get(item.item_id)
                if result is not None and result.status == "ok" and result.text is not None:
                    texts[sha256_text(result.text)] = result.text
        name, model = self.embedder.embedder_name, self.embedder.model
        vectors = self.cache.get_embeddings(name, model, texts)
        missing = sorted((sha for sha in texts if sha not in vectors), key=lambda s: len(texts[s]))
        if missing:
            with _RateProgress(self.console) as progress:
                task = progress.add_task("   embed", total=len(missing))
                size = self.embedder.chunk_size
                for start in range(0, len(missing), size):
                    chunk = missing[start:start + size]
                    matrix = await self.embedder.embed([texts[s] for s in chunk])
                    fresh = {sha: matrix[row] for row, sha in enumerate(chunk)}
                    self.cache.put_embeddings(name, model, fresh)
                    vectors.update(fresh)
                    progress.advance(task, len(chunk))
        return vectors

    def write_artefact(self, out_dir: Path, name: str, items: list[ItemRecord], facts: dict,
                       results: dict[Route, dict[int, ItemResult]], vectors: dict[str, np.ndarray],
                       report: DeriveReport) -> None:
        dims = {v.shape[0] for v in vectors.values()}
        if len(dims) != 1:
            raise RuntimeError(f"embedder returned vectors of different sizes: {sorted(dims)}")
        dim = dims.pop()
        n_rows = len(items) + 1

        def row_vector(text: str) -> np.ndarray:
            vector = vectors[sha256_text(text)].astype(np.float32)
            if self.options.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            return vector

        route_matrix = {Route.TEXTUAL: "text", Route.VISUAL: "visual", Route.HYBRID: "hybrid",
                        Route.XREFLECT: "xreflect"}
        matrices = {key: np.zeros((n_rows, dim), dtype=np.float32)
                    for key in (*(route_matrix[r] for r in self.routes), "original")}
        fallback_original: Counter = Counter()
        table: dict[str, list] = {"item_id": [], "external_id": [], "title": [], "original": []}
        for route in self.routes:
            table[route.value] = []
            table[f"{route.value}_status"] = []
        table["hybrid_rounds"] = []
        for item in items:
            matrices["original"][item.item_id] = row_vector(item.original_text)
            table["item_id"].append(item.item_id)
            table["external_id"].append(item.external_id)
            table["title"].append(item.title)
            table["original"].append(item.original_text)
            for route in self.routes:
                result = results[route].get(item.item_id)
                if result is not None and result.status == "ok" and result.text is not None:
                    matrices[route_matrix[route]][item.item_id] = row_vector(result.text)
                    status = "ok" if result.fallback is None else f"fallback:{result.fallback}"
                    text = result.text
                else:
                    # Only reached with allow_fallback="original" (the caller stops otherwise).
                    matrices[route_matrix[route]][item.item_id] = row_vector(item.original_text)
                    fallback_original[route.value] += 1
                    status = "failed:fallback_original"
                    text = None
                table[route.value].append(text)
                table[f"{route.value}_status"].append(status)
            hybrid = results[Route.HYBRID].get(item.item_id)
            table["hybrid_rounds"].append(hybrid.rounds if hybrid is not None else 0)

        if self._analyses:  # backends that read posters through the image analyser (describe, local-llm)
            image = np.zeros((n_rows, 1280), dtype=np.float32)
            for item in items:
                if item.image_sha in self._analyses:
                    image[item.item_id] = self._analyses[item.image_sha][1]
            matrices["image"] = image

        out_dir.mkdir(parents=True, exist_ok=True)
        counts = {route: {**dict(report.counts[route]), "fallback_original": fallback_original[route]}
                  for route in report.counts}
        tokens = {"prompt": 0, "completion": 0}
        for route in self.routes:
            for result in results[route].values():
                tokens["prompt"] += result.prompt_tokens
                tokens["completion"] += result.completion_tokens
        templates = {route.value: sorted({r.template for r in results[route].values()}) for route in self.routes}
        manifest = {
            "format": ARTEFACT_FORMAT,
            "name": name,
            **self.public_config(facts),
            "catalogue_items": facts["catalogue_items"],
            "n_items": len(items),
            "rows": "row 0 is padding (zeros); row i is internal item id i (prismrec.data id order)",
            "item_ids": ["<pad>", *[item.external_id for item in items]],
            "matrices": {key: list(m.shape) for key, m in matrices.items()},
            "dim": dim,
            "templates": templates,
            "counts": counts,
            "tokens": tokens,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        metadata = {"format": ARTEFACT_FORMAT, "name": name, "normalize": str(self.options.normalize)}
        _atomic(out_dir / "embeddings.safetensors", lambda p: save_file(matrices, str(p), metadata=metadata))
        _atomic(out_dir / "descriptions.parquet", lambda p: pd.DataFrame(table).to_parquet(p, index=False))
        _atomic(out_dir / "items.json", lambda p: p.write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


class _RateProgress(Progress):
    """Rich progress bar with items/s and ETA per task."""

    def __init__(self, console: Console) -> None:
        super().__init__(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _SpeedColumn(),
                         TimeRemainingColumn(), console=console)


class _SpeedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:7.1f} items/s")
