"""Prometheus metrics, ``/healthz`` and ``/readyz``, on ``STREAM_COUNTER_METRICS_PORT``.

The loop records each batch's outcome (counters and histograms: a few calls per batch of up
to 1,000 entries, never per entry) and, each reclaim interval, what it reads of the stream
and group (gauges: ``worker.status``). The HTTP server runs in a daemon thread and never
talks to Redis: a scrape reads the last values, ``/healthz`` the loop's own progress, and
``/readyz`` whether the last turn reached Redis with the group in place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from worker.batch import Outcome
from worker.status import Status

NAMESPACE = "stream_counter"
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Every metric of one worker, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, ns = self.registry, NAMESPACE

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=ns, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, namespace=ns, registry=r)

        self.applied = counter("events_applied", "Events written to their counters.")
        self.duplicates = counter(
            "duplicates_skipped", "Deliveries found already applied (entry or event_id marker)."
        )
        self.dead_lettered = counter(
            "dead_lettered",
            "Entries moved to the dead-letter stream, by reason: invalid (broke the event "
            "contract) or max_deliveries (its write failed MAX_DELIVERIES times).",
            ["reason"],
        )
        for reason in ("invalid", "max_deliveries"):
            self.dead_lettered.labels(reason)  # both series exist from the start, at 0
        self.claimed = counter("entries_claimed", "Entries claimed from idle replicas.")
        self.lock_busy = counter(
            "lock_busy", "Counters whose lock lanes another replica held (per attempt)."
        )
        self.lock_lost = counter("lock_lost", "Entries whose write fencing refused (lane lost).")
        self.write_failures = counter("write_failures", "Counter writes Redis refused.")
        self.reconnects = counter("redis_reconnects", "Times Redis became unreachable.")
        self.lock_wait = Histogram(
            "lock_wait_seconds",
            "Backoff per batch while its counters' lanes were busy (holding no lock).",
            namespace=ns,
            registry=r,
            buckets=WAIT_BUCKETS,
        )
        self.batch_seconds = Histogram(
            "batch_duration_seconds",
            "One batch from its first round trip to its finish.",
            namespace=ns,
            registry=r,
            buckets=BATCH_BUCKETS,
        )
        self.lag = gauge("group_lag", "Entries never delivered to the group.")
        self.lag_exact = gauge("group_lag_exact", "1 if group_lag is exact, 0 if a lower bound.")
        self.pending = gauge("pending", "Entries delivered to the group, not yet acknowledged.")
        self.oldest_pending = gauge(
            "oldest_pending_age_seconds", "Age of the oldest pending entry (0: none pending)."
        )
        self.dead_letter_length = gauge("dead_letter_length", "Entries in the dead-letter stream.")
        self.live_replicas = gauge("live_replicas", "Replicas that said lately they are alive.")
        self.replicas_agree = gauge(
            "replicas_agree",
            "1 if every live replica works on the same terms (protocol, LOCK_TTL_MS, "
            "CLAIM_IDLE_MS); 0: none applies until they agree.",
        )

    def batch(self, outcome: Outcome) -> None:
        self.applied.inc(outcome.applied)
        self.duplicates.inc(outcome.duplicates)
        if outcome.dead_lettered:
            worn = sum(1 for r in outcome.dead_lettered if r.fields is None)
            self.dead_lettered.labels("max_deliveries").inc(worn)
            self.dead_lettered.labels("invalid").inc(len(outcome.dead_lettered) - worn)
        self.lock_busy.inc(outcome.busy_counters)
        self.lock_lost.inc(outcome.lock_lost)
        self.write_failures.inc(outcome.write_failures)
        self.lock_wait.observe(outcome.lock_wait_ms / 1000)
        self.batch_seconds.observe(time.perf_counter() - outcome.started)

    def redis_state(self, status: Status) -> None:
        self.lag.set(status.lag or 0)
        self.lag_exact.set(int(status.lag_exact))
        self.pending.set(status.pending)
        self.oldest_pending.set((status.oldest_pending_age_ms or 0) / 1000)
        self.dead_letter_length.set(status.dead_letter_length)
        self.live_replicas.set(len(status.live_replicas))
        self.replicas_agree.set(int(status.replicas_agree))


Check = Callable[[], tuple[bool, str]]
"""A health check: (healthy, why in words)."""


def app(metrics: Metrics, live: Check, ready: Check) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: /healthz, /readyz, and the metrics everywhere else."""
    serve_metrics = make_wsgi_app(metrics.registry)

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, why = (live if path == "/healthz" else ready)()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{'ok' if ok else 'unhealthy'}: {why}\n".encode()]
        return serve_metrics(environ, start_response)

    return application


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


def serve(port: int, metrics: Metrics, live: Check, ready: Check) -> _Server:
    """Serve on every interface at ``port``, in a daemon thread; returns the server."""
    server = make_server("", port, app(metrics, live, ready), _Server, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
