"""Prometheus metrics of the server (``GET /metrics``, prometheus-client's text format).

* ``prismrec_requests_total{endpoint, model, status}``: answered requests; ``endpoint`` is the route
  template (``/items/{item_id}``, never the raw path, so ids do not multiply the series; ``refused`` for
  requests a limit stopped before routing, ``unmatched`` for unknown paths), ``model`` the export a
  request used (empty for endpoints without one);
* ``prismrec_request_duration_seconds{endpoint, model}``: latency histogram, from the first byte the
  application sees to the last byte of the answer;
* ``prismrec_requests_in_flight``: requests being handled now;
* ``prismrec_rejected_requests_total{reason}``: requests refused by a limit: ``body_too_large`` (413),
  ``header_too_large`` / ``too_many_headers`` (431), ``read_timeout`` (408, a client that sends too slowly),
  ``saturated`` (503, the in-flight cap), ``bad_framing`` (400, a malformed Content-Length).

The metrics are process-wide (one set per worker process). With ``prismrec serve --workers N`` the
parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before it starts the workers, each worker
writes its values there, and ``/metrics`` (answered by any worker) sums them over all workers
(prometheus-client's multiprocess mode; the in-flight gauge is a live sum).
"""

from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they double the output and say nothing here

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REJECTION_REASONS = ("body_too_large", "header_too_large", "too_many_headers", "read_timeout", "saturated",
                     "bad_framing")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("prismrec_requests", "HTTP requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.latency = Histogram("prismrec_request_duration_seconds", "request latency in seconds",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("prismrec_requests_in_flight", "requests being handled now",
                               registry=self.registry, multiprocess_mode="livesum")
        self.rejected = Counter("prismrec_rejected_requests", "requests refused by a server limit, by reason",
                                ["reason"], registry=self.registry)
        for reason in REJECTION_REASONS:  # every reason is exported from the start, at 0
            self.rejected.labels(reason)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (all workers' values in multiprocess mode)."""
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@lru_cache(maxsize=1)
def server_metrics() -> ServerMetrics:
    """The process's metrics (the HTTP protocol layer and the application count into the same set)."""
    return ServerMetrics()
