"""Running the API: uvicorn with a guarded HTTP/1.1 protocol, one or several worker processes.

:class:`GuardedH11Protocol` is uvicorn's h11 protocol with the limits an application cannot enforce,
because they act before a request exists or while it is still arriving:

* **a head that never ends**: bytes of a request line + headers without the blank line that ends them
  are counted as they arrive; past ``max_header_bytes`` the answer is 431 and the connection closes
  (h11 alone would buffer 16 KiB and answer 400);
* **slow clients**: from a connection's first byte, and from each later request's first byte, the whole
  request (head and body) must arrive within ``read_timeout_s``; otherwise 408 and the connection closes.
  A connection that opens and sends nothing is closed after the same time; between requests uvicorn's
  keep-alive timeout applies. Time spent computing the answer does not count.

Graceful shutdown is uvicorn's: on SIGTERM the listening socket closes (new connections are refused),
idle keep-alive connections close, requests in flight are finished (for at most ``graceful_timeout_s``)
and answered with ``Connection: close``; then the process exits 0.

``workers > 1``: uvicorn's supervisor starts N processes (spawned) that share the listening socket;
each loads the exports itself from the description in ``$PRISMREC_SERVE_SPEC`` (:func:`worker_app`),
memory-mapping the safetensors files (copy-on-write), so the weights and item tables sit once in the page
cache for all workers. On SIGTERM the supervisor closes its copy of the socket first, then stops the
workers gracefully.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from prismrec.serving.limits import ServerLimits, json_error
from prismrec.serving.metrics import MULTIPROC_ENV, server_metrics

SPEC_ENV = "PRISMREC_SERVE_SPEC"
TOKEN_ENV = "PRISMREC_SERVE_TOKEN"


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config plus the protocol-level limits (pickled to the workers with the rest)."""

    def __init__(self, app: Any, *, limits: ServerLimits, **kwargs: Any) -> None:
        kwargs.setdefault("h11_max_incomplete_event_size", max(limits.max_header_bytes, 16 << 10) + 1)
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.prismrec_limits = limits


class GuardedH11Protocol(H11Protocol):
    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ServerLimits = getattr(config, "prismrec_limits", None) or ServerLimits()
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            server_metrics().reject("header_too_large")
            self._answer_and_close(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")
            return
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request has arrived whole (or the connection is going): compute freely
        else:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._disarm()  # waiting for the next request: uvicorn's keep-alive timeout applies

    def _head_too_large(self, data: bytes) -> bool:
        limit = self.limits.max_header_bytes
        buffered = self.conn.trailing_data[0]
        if len(buffered) + len(data) <= limit:
            return False
        head = (buffered + data)[: limit + 4]
        end = head.find(b"\r\n\r\n")
        return end == -1 or end + 4 > limit

    def _arm(self) -> None:
        if self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        server_metrics().reject("read_timeout")
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._answer_and_close(408, f"request not received within {self.limits.read_timeout_s:g} s")

    def _answer_and_close(self, status: int, detail: str) -> None:
        """Write a complete JSON answer directly (h11 may be mid-request) and close the connection."""
        headers, body = json_error(status, detail)
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(status, b"Error")
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        self.transport.write(head + b"\r\n" + body)
        self.transport.close()


@dataclass
class ServeSpec:
    """Everything a worker needs to build the application (JSON in ``$PRISMREC_SERVE_SPEC``; no secrets:
    the bearer token stays in ``$PRISMREC_SERVE_TOKEN``)."""

    exports: list[str]
    data_dir: str | None = None
    index: str = "exact"
    threads: int = 1
    limits: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSpec:
        return cls(**json.loads(text))


def build_app(spec: ServeSpec) -> Any:
    """Load the exports (memory-mapped) and build the application; freeze what loading allocated out of the
    garbage collector's sight (it is never freed, and scanning it on every full collection costs time)."""
    import torch

    from prismrec.serving.app import create_app
    from prismrec.serving.export import load_export

    torch.set_num_threads(max(spec.threads, 1))
    data_dir = Path(spec.data_dir) if spec.data_dir else None
    exports = [load_export(Path(p), data_dir=data_dir, index=spec.index) for p in spec.exports]
    app = create_app(exports, token=os.environ.get(TOKEN_ENV) or None, limits=ServerLimits(**spec.limits))
    gc.collect()
    gc.freeze()
    return app


def worker_app() -> Any:
    """uvicorn's app factory in each worker process."""
    text = os.environ.get(SPEC_ENV)
    if not text:
        raise RuntimeError(f"${SPEC_ENV} is not set: worker_app is started by `prismrec serve --workers N`")
    return build_app(ServeSpec.from_json(text))


def run(spec: ServeSpec, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, access_log: bool = False,
        graceful_timeout_s: int = 30, app: Any = None) -> None:
    """Serve until SIGTERM / SIGINT. ``app``: an application already built (one worker only)."""
    limits = ServerLimits(**spec.limits)
    common = {"host": host, "port": port, "log_level": "warning", "access_log": access_log, "limits": limits,
              "timeout_graceful_shutdown": graceful_timeout_s, "timeout_keep_alive": 5}
    if workers <= 1:
        config = GuardedConfig(app if app is not None else build_app(spec), **common)
        # uvicorn re-raises the signal that stopped it once it has drained, to die "by" it; with these handlers
        # in place the re-raise is a no-op and a graceful stop exits 0.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            uvicorn.Server(config).run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return
    from uvicorn.supervisors.multiprocess import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="prismrec-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned workers
    os.environ[SPEC_ENV] = spec.to_json()
    try:
        config = GuardedConfig("prismrec.serving.server:worker_app", factory=True, workers=workers, **common)
        sock = config.bind_socket()
        supervisor = Multiprocess(config, sockets=[sock])

        def handle_term() -> None:  # stop listening first, so new connections are refused while workers drain
            sock.close()
            supervisor.should_exit.set()

        supervisor.handle_term = handle_term  # type: ignore[method-assign]
        supervisor.handle_int = handle_term  # type: ignore[method-assign]
        supervisor.run()
    finally:
        os.environ.pop(SPEC_ENV, None)
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
