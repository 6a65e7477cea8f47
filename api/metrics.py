"""Prometheus metrics: `GET /metrics`.

Two sources, both scraped without any background thread:

* HTTP traffic, recorded by a small ASGI middleware: request counts and
  latency histograms by method, route *template* (``/v1/tensors/{name}``, never
  the concrete path, so tensor names do not explode the label space) and
  status, plus request and response body bytes.
* Raft and state-machine figures per hosted shard, read from the store by
  a custom collector at scrape time (`status()` and `shard_stats()` of
  store/interface.py).

Every app gets its own registry (several apps can live in one test process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.interface import ShardStats, StoreAPI

from .table_metrics import TableCollector
from .traffic_metrics import TrafficCollector

ROLES = ("leader", "follower", "candidate")
UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("method", "route", "status")
        self.requests = Counter("paramstore_http_requests", "HTTP requests answered", labels, registry=registry)
        self.latency = Histogram(
            "paramstore_http_request_duration_seconds",
            "Time from request start to the last byte of the response",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.bytes_in = Counter(
            "paramstore_http_request_bytes", "Request body bytes received", ("method", "route"), registry=registry
        )
        self.bytes_out = Counter(
            "paramstore_http_response_bytes", "Response body bytes sent", ("method", "route"), registry=registry
        )
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram, Counter, Counter, list[int]]] = {}
        # (method, route) -> [requests, request bytes, response bytes]: what /v1/stats reads
        self.totals: dict[tuple[str, str], list[int]] = {}

    def record(self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        """Count one answered request. The labelled children are looked up
        once per (method, route, status): `labels()` costs more than `inc()`."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            code = str(status)
            children = (
                self.requests.labels(method, route, code),
                self.latency.labels(method, route, code),
                self.bytes_in.labels(method, route),
                self.bytes_out.labels(method, route),
                self.totals.setdefault((method, route), [0, 0, 0]),
            )
            self._children[key] = children
        requests, latency, received, sent, totals = children
        requests.inc()
        latency.observe(seconds)
        totals[0] += 1
        if bytes_in:
            received.inc(bytes_in)
            totals[1] += bytes_in
        if bytes_out:
            sent.inc(bytes_out)
            totals[2] += bytes_out


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): streaming bodies pass through untouched.
    The route label is the template the router (or api/fastpath.py) matched."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        received = sent = 0
        status = 500

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.record(
                scope.get("method", ""),
                getattr(route, "path", None) or UNMATCHED,
                status,
                time.perf_counter() - started,
                received,
                sent,
            )


Family = type[GaugeMetricFamily] | type[CounterMetricFamily]
SHARD_FIGURES: tuple[tuple[Family, str, str, Callable[[ShardStats], float]], ...] = (
    (
        GaugeMetricFamily,
        "paramstore_shard_has_leader",
        "1 when this replica knows a leader for the shard",
        lambda s: 0.0 if s.leader is None else 1.0,
    ),
    (GaugeMetricFamily, "paramstore_shard_ready", "1 when the shard is ready here", lambda s: float(s.ready)),
    (GaugeMetricFamily, "paramstore_shard_term", "Current Raft term", lambda s: float(s.term)),
    (GaugeMetricFamily, "paramstore_shard_commit_index", "Raft commit index", lambda s: float(s.commit_index)),
    (
        GaugeMetricFamily,
        "paramstore_shard_applied_index",
        "Raft index applied by this replica",
        lambda s: float(s.applied_index),
    ),
    (
        GaugeMetricFamily,
        "paramstore_shard_apply_lag_entries",
        "commit index minus applied index",
        lambda s: float(max(0, s.commit_index - s.applied_index)),
    ),
    (GaugeMetricFamily, "paramstore_shard_log_entries", "Entries in the Raft log", lambda s: float(s.log_entries)),
    (
        GaugeMetricFamily,
        "paramstore_shard_last_snapshot_duration_seconds",
        "Duration of the last snapshot write",
        lambda s: s.last_snapshot_seconds,
    ),
    (
        GaugeMetricFamily,
        "paramstore_shard_last_snapshot_bytes",
        "Size of the last snapshot file",
        lambda s: float(s.last_snapshot_bytes),
    ),
    (GaugeMetricFamily, "paramstore_shard_tensors", "Tensors held", lambda s: float(s.tensors)),
    (GaugeMetricFamily, "paramstore_shard_bytes", "Bytes held (values and optimizer state)", lambda s: float(s.bytes)),
    (
        CounterMetricFamily,
        "paramstore_shard_leader_changes",
        "Leader changes seen by this replica",
        lambda s: float(s.leader_changes),
    ),
    (CounterMetricFamily, "paramstore_shard_snapshots", "Snapshots written", lambda s: float(s.snapshots)),
    (
        CounterMetricFamily,
        "paramstore_shard_applied_commands",
        "Commands applied by the shard's applier",
        lambda s: float(s.applied_commands),
    ),
    (
        CounterMetricFamily,
        "paramstore_shard_apply_seconds",
        "Time the applier spent applying commands (divide by applied_commands for the mean)",
        lambda s: s.apply_seconds,
    ),
    (
        CounterMetricFamily,
        "paramstore_shard_sync_rounds_closed",
        "Synchronous rounds closed (optimizer applied to their gradients), by workers or by round_timeout",
        lambda s: float(s.rounds_closed),
    ),
    (
        CounterMetricFamily,
        "paramstore_shard_sync_rounds_timed_out",
        "Synchronous rounds closed by round_timeout with fewer gradients than needed",
        lambda s: float(s.rounds_timed_out),
    ),
    (
        CounterMetricFamily,
        "paramstore_shard_sync_late_grads_refused",
        "Gradients refused (409) because their synchronous round had closed",
        lambda s: float(s.late_grads_refused),
    ),
)


class StoreCollector(Collector):
    """Reads the store at scrape time. Only shards hosted here are reported."""

    def __init__(self, store: StoreAPI) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        node = self.store.node.id
        status = self.store.status()
        ready = GaugeMetricFamily(
            "paramstore_ready", "1 when every hosted shard has a leader and this replica caught up", labels=["node"]
        )
        ready.add_metric([node], 1.0 if status.get("ready") else 0.0)
        yield ready
        uptime = GaugeMetricFamily("paramstore_uptime_seconds", "Seconds since the store started", labels=["node"])
        uptime.add_metric([node], float(status.get("uptime_seconds", 0.0)))
        yield uptime
        yield from shard_metrics(node, self.store.shard_stats())


def shard_metrics(node: str, stats: list[ShardStats]) -> Iterator[Metric]:
    labels = ["node", "shard"]
    role = GaugeMetricFamily(
        "paramstore_shard_role",
        "1 for this replica's current Raft role in the shard, 0 for the others",
        labels=[*labels, "role"],
    )
    for s in stats:
        for r in ROLES:
            role.add_metric([node, str(s.shard), r], 1.0 if s.role == r else 0.0)
    yield role
    for family, name, doc, value in SHARD_FIGURES:
        metric = family(name, doc, labels=labels)
        for s in stats:
            metric.add_metric([node, str(s.shard)], value(s))
        yield metric


def install(app: FastAPI) -> None:
    """Add the middleware and `GET /metrics` to `app` (its store is read at scrape time)."""
    registry = CollectorRegistry(auto_describe=False)
    http = HttpMetrics(registry)
    registry.register(StoreCollector(app.state.store))
    registry.register(TableCollector(app.state.store))  # embedding tables (api/table_metrics.py)
    registry.register(TrafficCollector(app.state.store))  # bytes per peer, commit latency (api/traffic_metrics.py)
    app.state.metrics_registry = registry
    app.state.http_metrics = http
    app.add_middleware(MetricsMiddleware, metrics=http)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
