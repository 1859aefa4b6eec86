"""Request limits that hold however a request is framed, as an ASGI middleware (:class:`RequestGuard`).

The body is read as a stream and counted as it arrives: the request is refused with 413 as soon as the
count passes ``max_body_bytes``, whether the body is framed by a Content-Length, by chunked transfer
encoding (no length known in advance), or by a Content-Length that lies (a small one next to
``Transfer-Encoding: chunked``, which then frames the body). A declared Content-Length above the limit
is refused before a byte of the body is read. At most ``max_body_bytes`` of a body is ever held.

Also here: a cap on the number of headers and on the head's size (431), and a cap on the requests in
flight (503 with ``Retry-After``; ``/health`` and ``/metrics`` are exempt, so monitoring still answers
when the server is saturated). Refusals close the connection (``Connection: close``), so an unread body
is never drained. The limits the application cannot see (a head that never ends, a client that sends too
slowly) are enforced by the HTTP protocol layer in :mod:`prismrec.serving.server`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prismrec.serving.metrics import ServerMetrics, server_metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_SCOPE_KEY = "prismrec.model"  # an endpoint records the export it used here (the metrics' model label)


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10  # request line + all header lines
    max_headers: int = 100
    read_timeout_s: float = 10.0  # from a request's first byte to its last (head and body)
    max_in_flight: int = 128  # per server process
    retry_after_s: int = 1
    max_history: int = 5000
    max_candidates: int = 10000
    max_k: int = 1000
    max_search_results: int = 100
    max_explained_items: int = 50  # "explain": true is refused for larger k

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"server limit {name} must be positive (got {value})")


def json_error(status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] | None = None
               ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra_headers or [])]
    return headers, body


def head_size(scope: Scope) -> int:
    """Bytes of the request line and header lines as sent (method, target, version, CRLFs)."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    line = len(scope.get("method", "")) + target + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


class RequestGuard:
    """ASGI middleware: bounded heads and bodies, an in-flight cap and the request metrics."""

    exempt = ("/health", "/metrics")

    def __init__(self, app: ASGIApp, limits: ServerLimits, metrics: ServerMetrics | None = None) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics or server_metrics()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = [0]

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        self.in_flight += 1
        try:
            refusal = self._check_head(scope)
            if refusal is None:
                body_receive = await self._read_body(scope, receive, counting_send)
                if body_receive is not None:
                    await self.app(scope, body_receive, counting_send)
            else:
                await self._refuse(counting_send, *refusal)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("refused" if self._refused(status[0]) else "unmatched")
            model = str(scope.get(MODEL_SCOPE_KEY) or "")
            if status[0]:
                self.metrics.requests.labels(endpoint, model, str(status[0])).inc()
                self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - start)

    def _check_head(self, scope: Scope) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
        limits = self.limits
        headers = scope.get("headers", ())
        if len(headers) > limits.max_headers:
            return 431, "too_many_headers", (f"request has {len(headers)} header lines; the limit is "
                                             f"{limits.max_headers}"), []
        size = head_size(scope)
        if size > limits.max_header_bytes:
            return 431, "header_too_large", (f"request line and headers take {size} bytes; the limit is "
                                             f"{limits.max_header_bytes} bytes"), []
        # self.in_flight counts this request already
        if scope.get("path") not in self.exempt and self.in_flight > limits.max_in_flight:
            retry = [(b"retry-after", str(limits.retry_after_s).encode())]
            return 503, "saturated", (f"server busy: {limits.max_in_flight} requests in flight; retry after "
                                      f"{limits.retry_after_s} s"), retry
        return None

    @staticmethod
    def _refused(status: int) -> bool:
        return status in (400, 413, 431, 503)

    async def _refuse(self, send: Send, status: int, reason: str, detail: str,
                      extra: list[tuple[bytes, bytes]]) -> None:
        self.metrics.reject(reason)
        headers, body = json_error(status, detail, extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The whole body (at most the limit) read up front; a ``receive`` that replays it, or None when the
        request was refused (the answer is sent) or the client went away."""
        limit = self.limits.max_body_bytes
        lengths = [v for k, v in scope.get("headers", ()) if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in scope.get("headers", ()))
        if not lengths and not chunked:
            return receive  # no body (HTTP/1.1 without a framing header has none)
        if lengths and not chunked:
            if len(set(lengths)) > 1 or not lengths[0].strip().isdigit():
                await self._refuse(send, 400, "bad_framing", "invalid Content-Length header", [])
                return None
            declared = int(lengths[0])
            if declared > limit:
                await self._refuse(send, 413, "body_too_large", f"request body of {declared} bytes exceeds the "
                                                                f"limit of {limit} bytes", [])
                return None
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._refuse(send, 413, "body_too_large", f"request body exceeds the limit of {limit} "
                                                                f"bytes (stopped reading at {total} bytes)", [])
                return None
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay
