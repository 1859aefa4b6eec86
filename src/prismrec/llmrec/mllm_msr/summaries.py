"""MLLM-MSR step 2, recurrent user-preference summaries (paper Figure 2): a user's history in blocks, each block
summarised with the previous summary through a semantic backend and the SQLite generation cache
(:class:`UserSummariser`, built by :func:`build_summariser`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prismrec.llmrec.mllm_msr.config import SummaryOptions
from prismrec.llmrec.mllm_msr.prompts import EMPTY_HISTORY_SUMMARY, USER_SUMMARY_FIRST, USER_SUMMARY_UPDATE, ItemTexts
from prismrec.semantics.backends.base import BACKENDS, Backend, answer_problem
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.prompts import Route
from prismrec.semantics.types import (
    ChatMessage,
    Generation,
    GenerationFailure,
    GenerationRequest,
    ItemRecord,
    stable_hash,
)


@dataclass(frozen=True)
class SummaryStep:
    """One call of the recursion: the block it summarised, the prompt sent and the summary it returned."""

    block: tuple[int, ...]
    prompt: str
    summary: str
    cached: bool


class SummaryError(RuntimeError):
    """A summary call failed after the backend's retries; the blocks already answered stay cached."""


class UserSummariser:
    """Block-recursive user summaries through a semantic backend and the SQLite generation cache.

    Windows are tuples of item ids (the capped history); users sharing a window share its summaries.
    All users' block ``k`` calls are sent together (batched / concurrent per the backend), block after block.
    """

    def __init__(self, options: SummaryOptions, backend: Backend, cache: SemanticCache, items: ItemTexts) -> None:
        self.options = options
        self.backend = backend
        self.cache = cache
        self.items = items
        self._memory: dict[tuple[int, ...], list[SummaryStep]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def window(self, history: Sequence[int], anchor_length: int) -> tuple[int, ...]:
        """The capped history: from ``anchor_length - max_history`` (the start is fixed by the training
        sequence's length, so later windows extend earlier ones) to the end of ``history``."""
        start = max(0, anchor_length - self.options.max_history)
        return tuple(int(i) for i in history[start:])

    def blocks(self, window: tuple[int, ...]) -> list[tuple[int, ...]]:
        size = self.options.block_size
        return [window[i:i + size] for i in range(0, len(window), size)]

    def _items_text(self, block: tuple[int, ...]) -> str:
        return "\n".join(f"- {self.items.text(item)}" for item in block)

    def request(self, user_label: str, block: tuple[int, ...], previous: str | None, turn: int) -> GenerationRequest:
        if previous is None:
            template, text = USER_SUMMARY_FIRST, USER_SUMMARY_FIRST.render(items=self._items_text(block))
        else:
            template = USER_SUMMARY_UPDATE
            text = USER_SUMMARY_UPDATE.render(summary=previous, items=self._items_text(block))
        record = ItemRecord(item_id=0, external_id=f"user:{user_label}", attributes={}, image_path=None,
                            image_sha=None)
        return GenerationRequest(item=record, route=Route.TEXTUAL, template_key=template.key,
                                 modality="text", messages=(ChatMessage("user", text),), turn=turn)

    def cache_key(self, request: GenerationRequest) -> str:
        # The same key material as the derivation engine: the conversation (so the previous summary and
        # the block's items, i.e. the (user, prefix) state), the template version, backend and parameters.
        return stable_hash({"backend": self.backend.backend_name, "model": self.backend.model,
                            "template": request.template_key, "messages": request.cache_material(),
                            "params": self.backend.generation_params()})

    async def _generate(self, requests: list[GenerationRequest]) -> list[tuple[str, bool]]:
        """(summary, cached) per request: cache first, then the backend in batches, committed as they arrive."""
        keys = [self.cache_key(r) for r in requests]
        out: list[tuple[str, bool] | None] = [None] * len(requests)
        misses: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            hit = self.cache.get_generation(key)
            if hit is not None:
                out[i] = (hit.text, True)
            else:
                misses.setdefault(key, []).append(i)
        unique = [(key, rows) for key, rows in misses.items()]
        size = max(1, self.backend.batch_size)
        chunks = [unique[start:start + size] for start in range(0, len(unique), size)]
        limit = asyncio.Semaphore(max(1, self.backend.concurrency))

        async def run(chunk: list[tuple[str, list[int]]]) -> None:
            async with limit:
                answers = await self.backend.generate_batch([requests[rows[0]] for _, rows in chunk])
            for (key, rows), answer in zip(chunk, answers, strict=True):
                request = requests[rows[0]]
                if isinstance(answer, GenerationFailure):
                    raise SummaryError(f"{request.item.external_id}, block {request.turn}: {answer.reason} "
                                       f"(after {answer.attempts} attempt(s))")
                assert isinstance(answer, Generation)
                # A small local model often runs past max_tokens: a cut summary still carries the
                # preferences, so truncation is accepted here (empty or refused answers are not).
                reason = None if answer.finish_reason == "length" else answer.finish_reason
                problem = answer_problem(answer.text, reason)
                if problem is not None:
                    raise SummaryError(f"{request.item.external_id}, block {request.turn}: {problem}")
                self.cache.put_generation(key, backend=self.backend.backend_name, model=self.backend.model,
                                          template=request.template_key, route="user-summary",
                                          item=request.item.external_id, turn=request.turn, generation=answer)
                for row in rows:
                    out[row] = (answer.text.strip(), False)

        await asyncio.gather(*(run(chunk) for chunk in chunks))
        return [o for o in out if o is not None]

    async def summarise_async(self, windows: dict[str, tuple[int, ...]],
                              on_round: Callable[[int, int], None] | None = None) -> dict[str, list[SummaryStep]]:
        """``{user_label: window}`` -> ``{user_label: steps}`` (the last step's summary is the user's)."""
        steps: dict[str, list[SummaryStep]] = {label: [] for label in windows}
        pending = {label: window for label, window in windows.items()
                   if window and window not in self._memory}
        for label, window in windows.items():
            if window in self._memory:
                steps[label] = list(self._memory[window])
        plans = {label: self.blocks(window) for label, window in pending.items()}
        rounds = max((len(b) for b in plans.values()), default=0)
        for turn in range(rounds):
            active = [label for label, blocks in plans.items() if turn < len(blocks)]
            requests = [self.request(label, plans[label][turn], steps[label][-1].summary if turn else None, turn)
                        for label in active]
            answers = await self._generate(requests)
            for label, request, (summary, cached) in zip(active, requests, answers, strict=True):
                steps[label].append(SummaryStep(plans[label][turn], request.messages[-1].text, summary, cached))
            if on_round is not None:
                on_round(turn, len(active))
        for label, window in pending.items():
            self._memory[window] = steps[label]
        return steps

    def summarise(self, windows: dict[str, tuple[int, ...]], console: Console | None = None,
                  quiet: bool = False) -> dict[str, str]:
        """Final summary per user label (windows with no items get a fixed sentence and no call)."""
        total = sum(len(self.blocks(w)) for w in windows.values() if w and w not in self._memory)
        if self._loop is None or self._loop.is_closed():
            # One event loop for the summariser's life: HTTP clients (openai backend) are bound to it.
            self._loop = asyncio.new_event_loop()
        with progress_bar(console, quiet) as progress:
            task = progress.add_task("user summaries (blocks)", total=total)
            steps = self._loop.run_until_complete(
                self.summarise_async(windows, lambda _turn, n: progress.advance(task, n)))
        return {label: s[-1].summary if s else EMPTY_HISTORY_SUMMARY for label, s in steps.items()}

    def close(self) -> None:
        """Release the backend (connections, models) and the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self.backend.aclose())
            self._loop.close()

    def __enter__(self) -> UserSummariser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_summariser(options: SummaryOptions, cache: SemanticCache, items: ItemTexts) -> UserSummariser:
    backend = BACKENDS.get(options.backend)(options.validated_backend_options(), cache)
    if not backend.iterates_internally:
        raise ValueError(f"the {options.backend!r} backend has no generative model; user summaries need one "
                         "(local-llm, transformers, openai)")
    return UserSummariser(options, backend, cache, items)


def progress_bar(console: Console | None, quiet: bool) -> Progress:
    """The rich progress bar of every MLLM-MSR stage (summaries, fine-tuning, scoring), on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console or Console(stderr=True), disable=quiet)
