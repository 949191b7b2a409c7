"""Prometheus metrics of the operator, served on `--metrics-port` (prometheus_client's own HTTP server).

The default registry also carries the client's process collector (`process_resident_memory_bytes`,
`process_cpu_seconds_total`, ...), so the operator's footprint is scraped along with its work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server

# No `*_created` series next to every counter: nothing here needs to tell a reset from a counter created late.
disable_created_metrics()

RECONCILES = Counter(
    "borg_operator_reconciles_total",
    "Reconciles of a BorgCollective, by result: applied (children applied), paused, invalid (the spec cannot "
    "run), blocked (an API the spec needs is not served), error (a request failed; retried)",
    ["result"],
)
ERRORS = Counter(
    "borg_operator_errors_total",
    "Failures, by stage: reconcile, status (computing or writing the status)",
    ["stage"],
)
RECONCILE_SECONDS = Histogram(
    "borg_operator_reconcile_duration_seconds",
    "Time one reconcile takes: read the Secret, build, apply every child, prune, write the status",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
STATUS_WRITES = Counter("borg_operator_status_writes_total", "Status patches written (only when it changed)")
EVENTS = Counter("borg_operator_events_total", "Kubernetes events posted on collectives, by type", ["type"])
CHILDREN = Counter(
    "borg_operator_children_total",
    "Children the reconciles created, changed or pruned (no-op applies are not counted)",
    ["change"],
)


@contextmanager
def timed_reconcile() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serves /metrics on `address:port` in a daemon thread (port 0: not served)."""
    if port:
        start_http_server(port, addr=address)
