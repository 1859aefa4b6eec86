"""HTTP client for OpenAI-compatible servers (vLLM, Ollama, llama.cpp server, OpenAI) with retries and fan-out.

Retry policy (shared by the chat backend and the embedder): timeouts, connection errors (resets
included), HTTP 408/429/5xx, malformed JSON and answers the caller rejects (empty, truncated, refused)
are retried up to ``max_retries`` times with exponential backoff and "equal jitter"
(sleep uniformly in ``[d/2, d]`` with ``d = min(backoff_max_s, backoff_base_s * 2**attempt)``; a
``Retry-After`` header raises ``d`` up to the cap). Other 4xx errors (bad request, auth) are not retried.

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


class RequestFailed(Exception):
    """All attempts failed; ``reason`` says why (no secrets)."""

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


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
                    detail = response.text[:200].replace("\n", " ")
                    last_problem = f"HTTP {response.status_code} from {url}: {detail}"
                    if response.status_code not in RETRYABLE_STATUS:
                        raise RequestFailed(last_problem, attempts)
                    retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    try:
                        payload = response.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        last_problem = f"malformed JSON from {url}: {response.text[:80]!r}"
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
            except httpx.TimeoutException:
                last_problem = f"timeout after {self.options.timeout_s:g}s from {url}"
            except httpx.TransportError as error:
                last_problem = f"{type(error).__name__} from {url}"
            finally:
                self._in_flight[url] -= 1
                self._idle[url].put_nowait(client)
            # Whatever went wrong (overload, crash, bad answer), the next attempt prefers another server.
            avoid = url
            if attempt < self.options.max_retries:
                self.retries += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise RequestFailed(last_problem, attempts)

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
