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
from typing import Iterable

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from store.interface import StoreAPI

ROLES = ("leader", "follower", "candidate")
UNMATCHED = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("method", "route", "status")
        self.requests = Counter("paramstore_http_requests", "HTTP requests answered",
                                labels, registry=registry)
        self.latency = Histogram("paramstore_http_request_duration_seconds",
                                 "Time from request start to the last byte of the response",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.bytes_in = Counter("paramstore_http_request_bytes", "Request body bytes received",
                                ("method", "route"), registry=registry)
        self.bytes_out = Counter("paramstore_http_response_bytes", "Response body bytes sent",
                                 ("method", "route"), registry=registry)
        self._children: dict[tuple[str, str, int], tuple] = {}

    def record(self, method: str, route: str, status: int, seconds: float, bytes_in: int,
               bytes_out: int) -> None:
        """Count one answered request. The labelled children are looked up
        once per (method, route, status): `labels()` costs more than `inc()`."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            code = str(status)
            children = (self.requests.labels(method, route, code), self.latency.labels(method, route, code),
                        self.bytes_in.labels(method, route), self.bytes_out.labels(method, route))
            self._children[key] = children
        requests, latency, received, sent = children
        requests.inc()
        latency.observe(seconds)
        if bytes_in:
            received.inc(bytes_in)
        if bytes_out:
            sent.inc(bytes_out)


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
            self.metrics.record(scope.get("method", ""), getattr(route, "path", None) or UNMATCHED,
                                status, time.perf_counter() - started, received, sent)


class StoreCollector(Collector):
    """Reads the store at scrape time. Only shards hosted here are reported."""

    def __init__(self, store: StoreAPI) -> None:
        self.store = store

    def collect(self) -> Iterable:
        store = self.store
        node = store.node.id
        status = store.status()

        ready = GaugeMetricFamily("paramstore_ready", "1 when every hosted shard has a leader and "
                                  "this replica caught up", labels=["node"])
        ready.add_metric([node], 1.0 if status.get("ready") else 0.0)
        yield ready
        uptime = GaugeMetricFamily("paramstore_uptime_seconds", "Seconds since the store started",
                                   labels=["node"])
        uptime.add_metric([node], float(status.get("uptime_seconds", 0.0)))
        yield uptime

        lbl = ["node", "shard"]
        g = {
            "role": GaugeMetricFamily("paramstore_shard_role", "1 for this replica's current Raft "
                                      "role in the shard, 0 for the others", labels=lbl + ["role"]),
            "has_leader": GaugeMetricFamily("paramstore_shard_has_leader",
                                            "1 when this replica knows a leader for the shard", labels=lbl),
            "ready": GaugeMetricFamily("paramstore_shard_ready", "1 when the shard is ready here", labels=lbl),
            "term": GaugeMetricFamily("paramstore_shard_term", "Current Raft term", labels=lbl),
            "commit": GaugeMetricFamily("paramstore_shard_commit_index", "Raft commit index", labels=lbl),
            "applied": GaugeMetricFamily("paramstore_shard_applied_index",
                                         "Raft index applied by this replica", labels=lbl),
            "lag": GaugeMetricFamily("paramstore_shard_apply_lag_entries",
                                     "commit index minus applied index", labels=lbl),
            "log": GaugeMetricFamily("paramstore_shard_log_entries", "Entries in the Raft log", labels=lbl),
            "snap_secs": GaugeMetricFamily("paramstore_shard_last_snapshot_duration_seconds",
                                           "Duration of the last snapshot write", labels=lbl),
            "snap_bytes": GaugeMetricFamily("paramstore_shard_last_snapshot_bytes",
                                            "Size of the last snapshot file", labels=lbl),
            "tensors": GaugeMetricFamily("paramstore_shard_tensors", "Tensors held", labels=lbl),
            "bytes": GaugeMetricFamily("paramstore_shard_bytes",
                                       "Bytes held (values and optimizer state)", labels=lbl),
        }
        c = {
            "leader_changes": CounterMetricFamily("paramstore_shard_leader_changes",
                                                  "Leader changes seen by this replica", labels=lbl),
            "snapshots": CounterMetricFamily("paramstore_shard_snapshots", "Snapshots written", labels=lbl),
            "applied": CounterMetricFamily("paramstore_shard_applied_commands",
                                           "Commands applied by the shard's applier", labels=lbl),
            "apply_secs": CounterMetricFamily("paramstore_shard_apply_seconds",
                                              "Time the applier spent applying commands "
                                              "(divide by applied_commands for the mean)", labels=lbl),
        }
        for s in store.shard_stats():
            key = [node, str(s.shard)]
            for r in ROLES:
                g["role"].add_metric(key + [r], 1.0 if s.role == r else 0.0)
            g["has_leader"].add_metric(key, 0.0 if s.leader is None else 1.0)
            g["ready"].add_metric(key, 1.0 if s.ready else 0.0)
            g["term"].add_metric(key, float(s.term))
            g["commit"].add_metric(key, float(s.commit_index))
            g["applied"].add_metric(key, float(s.applied_index))
            g["lag"].add_metric(key, float(max(0, s.commit_index - s.applied_index)))
            g["log"].add_metric(key, float(s.log_entries))
            g["tensors"].add_metric(key, float(s.tensors))
            g["bytes"].add_metric(key, float(s.bytes))
            g["snap_secs"].add_metric(key, s.last_snapshot_seconds)
            g["snap_bytes"].add_metric(key, float(s.last_snapshot_bytes))
            c["leader_changes"].add_metric(key, float(s.leader_changes))
            c["snapshots"].add_metric(key, float(s.snapshots))
            c["applied"].add_metric(key, float(s.applied_commands))
            c["apply_secs"].add_metric(key, s.apply_seconds)
        yield from g.values()
        yield from c.values()


def install(app: FastAPI) -> None:
    """Add the middleware and `GET /metrics` to `app` (its store is read at scrape time)."""
    registry = CollectorRegistry(auto_describe=False)
    http = HttpMetrics(registry)
    registry.register(StoreCollector(app.state.store))
    app.state.metrics_registry = registry
    app.state.http_metrics = http
    app.add_middleware(MetricsMiddleware, metrics=http)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
