"""HTTP client for OpenAI-compatible servers (vLLM, Ollama, llama.cpp server, OpenAI) with retries and fan-out.

Retry policy (shared by the chat backend and the embedder): *transient* failures are retried up to
``max_retries`` times with exponential backoff and "equal jitter" (sleep uniformly in ``[d/2, d]`` with
``d = min(backoff_max_s, backoff_base_s * 2**attempt)``; a ``Retry-After`` header raises ``d`` up to the
cap): timeouts, connection errors (resets included), HTTP 408/409/425/429/5xx, malformed JSON and answers
the caller rejects as :class:`RetryableAnswer` (empty, refused). *Permanent* failures are never retried,
because the same request fails the same way again (:func:`classify_error`): an input the model cannot
take (an image sent to a text-only model: llama-server's HTTP 500 "image input is not supported", vLLM's
400 "... is not a multimodal model", Ollama's 400 "... does not support vision"), a prompt longer than the
context (llama-server's ``exceed_context_size_error``, vLLM's "maximum context length"), any other 4xx
(bad request, auth, unknown model, 422), and answers the caller rejects as :class:`PermanentAnswer`
(truncation at temperature 0 with the same ``max_tokens``). :class:`RequestFailed` says which it was
(``permanent``, ``kind``).

Fan-out: with several base URLs, each request goes to the server with the fewest requests in flight
(ties rotate), and a retry prefers a server other than the one that just failed.

The API key is read from an environment variable and only ever placed in the Authorization header: it
is never logged, stored, or put in an error message.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIConnectionOptions(BaseModel):
    """Where and how to reach OpenAI-compatible servers."""

    model_config = ConfigDict(extra="forbid")
    base_urls: list[str] = Field(["http://127.0.0.1:8000/v1"], min_length=1,
                                 description="one or more servers' /v1 URLs; requests fan out across them")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key "
                             "(unset: no Authorization header, as local servers expect)")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight per base URL")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout")
    max_retries: int = Field(4, ge=0, le=20, description="retries after the first attempt")
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)

    @field_validator("base_urls")
    @classmethod
    def _strip(cls, urls: list[str]) -> list[str]:
        cleaned = [u.rstrip("/") for u in urls]
        for url in cleaned:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base URL {url!r} must start with http:// or https://")
        return cleaned


class RetryableAnswer(Exception):
    """Raised by a response validator: the server answered, but the answer is unusable; ask again."""


class PermanentAnswer(Exception):
    """Raised by a response validator: the answer is unusable and asking again would give the same one."""

    def __init__(self, reason: str, kind: str = "answer") -> None:
        super().__init__(reason)
        self.kind = kind


# What servers say when a request cannot succeed however often it is sent, by kind. Matched (lower case)
# against the error body: llama.cpp's llama-server, vLLM and Ollama phrase these differently.
PERMANENT_MESSAGES: dict[str, tuple[str, ...]] = {
    "image_unsupported": (
        "image input is not supported",  # llama-server without --mmproj (HTTP 500)
        "is not a multimodal model",  # vLLM serving a text-only model (HTTP 400)
        "does not support vision",  # Ollama, a model without the vision capability (HTTP 400)
        "does not support image",
        "only 'text' content type is supported",
    ),
    "context_length": (
        "exceeds the available context size",  # llama-server (HTTP 400, type exceed_context_size_error)
        "exceed_context_size_error",
        "is larger than the max context size",  # llama-server without context shift
        "maximum context length",  # vLLM / OpenAI (HTTP 400)
        "context_length_exceeded",
        "reduce the length of the messages",
    ),
}


@dataclass(frozen=True)
class ErrorClass:
    permanent: bool
    kind: str  # image_unsupported, context_length, client_error, server_error, timeout, connection, answer


def classify_error(status: int, body: str) -> ErrorClass:
    """Whether an HTTP error answer can change if the same request is sent again (see the module docstring)."""
    lowered = body.lower()
    for kind, phrases in PERMANENT_MESSAGES.items():
        if any(phrase in lowered for phrase in phrases):
            return ErrorClass(True, kind)
    if status in RETRYABLE_STATUS:
        return ErrorClass(False, "server_error" if status >= 500 else "overloaded")
    return ErrorClass(True, "client_error")


class RequestFailed(Exception):
    """Every attempt failed, or one failed permanently; ``reason`` says why (no secrets)."""

    def __init__(self, reason: str, attempts: int, *, permanent: bool = False, kind: str = "transient") -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.permanent = permanent
        self.kind = kind


@dataclass
class Response:
    payload: dict[str, Any]
    latency_s: float
    attempts: int
    base_url: str


class OpenAIClient:
    """Posts JSON to ``{base_url}{path}`` with the retry policy above."""

    def __init__(self, options: OpenAIConnectionOptions, *, rng: random.Random | None = None) -> None:
        self.options = options
        key = os.environ.get(options.api_key_env) if options.api_key_env else None
        self.api_key_set = bool(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # One single-connection client per concurrent slot and server: httpx's shared pool spends time
        # proportional to its size on every request, which caps throughput at high concurrency.
        # One TLS context for all of them (building one reads the CA bundle: ~0.1 s each).
        tls = httpx.create_ssl_context()
        self._idle: dict[str, asyncio.LifoQueue[httpx.AsyncClient]] = {}
        self._clients: list[httpx.AsyncClient] = []
        for url in options.base_urls:
            queue: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()
            for _ in range(options.concurrency):
                client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(options.timeout_s), verify=tls,
                                           limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
                self._clients.append(client)
                queue.put_nowait(client)
            self._idle[url] = queue
        self._in_flight = dict.fromkeys(options.base_urls, 0)
        self._rotation = itertools.count()
        self._rng = rng or random.Random()
        self.requests_sent = 0
        self.retries = 0

    @property
    def total_concurrency(self) -> int:
        return self.options.concurrency * len(self.options.base_urls)

    def _pick(self, avoid: str | None) -> str:
        urls = self.options.base_urls
        candidates = [u for u in urls if u != avoid] or list(urls)
        least = min(self._in_flight[u] for u in candidates)
        tied = [u for u in candidates if self._in_flight[u] == least]
        return tied[next(self._rotation) % len(tied)]

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.options.backoff_max_s, self.options.backoff_base_s * (2 ** attempt))
        if retry_after is not None:
            ceiling = min(self.options.backoff_max_s, max(ceiling, retry_after))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def post(self, path: str, body: dict[str, Any],
                   validate: Callable[[dict[str, Any]], None] | None = None) -> Response:
        """POST with retries; ``validate`` may raise :class:`RetryableAnswer` to ask again."""
        last_problem = "no attempt made"
        last_kind = "transient"
        avoid: str | None = None
        attempts = 0
        for attempt in range(self.options.max_retries + 1):
            attempts = attempt + 1
            url = self._pick(avoid)
            avoid = None
            retry_after: float | None = None
            client = await self._idle[url].get()
            self._in_flight[url] += 1
            started = time.perf_counter()
            try:
                self.requests_sent += 1
                response = await client.post(url + path, json=body)
                latency = time.perf_counter() - started
                if response.status_code != 200:
                    detail = response.text[:300].replace("\n", " ")
                    last_problem = f"HTTP {response.status_code} from {url}: {detail}"
                    verdict = classify_error(response.status_code, response.text[:4000])
                    last_kind = verdict.kind
                    if verdict.permanent:
                        raise RequestFailed(last_problem, attempts, permanent=True, kind=verdict.kind)
                    retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    try:
                        payload = response.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        last_problem = f"malformed JSON from {url}: {response.text[:80]!r}"
                        last_kind = "malformed"
                    else:
                        if not isinstance(payload, dict):
                            last_problem = f"unexpected JSON from {url}: {type(payload).__name__}"
                        else:
                            try:
                                if validate is not None:
                                    validate(payload)
                                return Response(payload, latency, attempts, url)
                            except RetryableAnswer as problem:
                                last_problem = str(problem)
                                last_kind = "answer"
                            except PermanentAnswer as problem:
                                raise RequestFailed(str(problem), attempts, permanent=True, kind=problem.kind) from None
            except httpx.TimeoutException:
                last_problem = f"timeout after {self.options.timeout_s:g}s from {url}"
                last_kind = "timeout"
            except httpx.TransportError as error:
                last_problem = f"{type(error).__name__} from {url}"
                last_kind = "connection"
            finally:
                self._in_flight[url] -= 1
                self._idle[url].put_nowait(client)
            # Whatever went wrong (overload, crash, bad answer), the next attempt prefers another server.
            avoid = url
            if attempt < self.options.max_retries:
                self.retries += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise RequestFailed(last_problem, attempts, permanent=False, kind=last_kind)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
