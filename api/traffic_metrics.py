"""Bytes per peer link, commit latency and replication lag in GET /metrics
(store/traffic.py counts them; the HTTP bytes per route are in api/metrics.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from store.interface import StoreAPI
from store.traffic import quantile

LATENCY_WINDOW = 60.0  # seconds of commits the latency quantiles cover


class TrafficCollector(Collector):
    def __init__(self, store: StoreAPI) -> None:
        self.store = store

    def collect(self) -> Iterable[Any]:
        node = self.store.node.id
        traffic = self.store.traffic(LATENCY_WINDOW)
        lbl = ["node", "channel", "peer"]
        received = CounterMetricFamily(
            "paramstore_peer_received_bytes",
            "Bytes received from a peer replica (raft: all shards; data: payloads)",
            labels=lbl,
        )
        sent = CounterMetricFamily("paramstore_peer_sent_bytes", "Bytes sent to a peer replica", labels=lbl)
        for link in traffic.links:
            received.add_metric([node, link.channel, link.peer], link.received)
            sent.add_metric([node, link.channel, link.peer], link.sent)
        yield received
        yield sent
        commits = CounterMetricFamily(
            "paramstore_commits", "Writes proposed here whose commit latency was measured", labels=["node"]
        )
        commits.add_metric([node], traffic.commits)
        yield commits
        latency = GaugeMetricFamily(
            "paramstore_commit_latency_seconds",
            f"Propose to applied here, writes of the last {LATENCY_WINDOW:.0f} s (0 without writes)",
            labels=["node", "quantile"],
        )
        for q in (0.5, 0.99):
            latency.add_metric([node, str(q)], quantile(traffic.commit_seconds, q))
        yield latency
        lag = GaugeMetricFamily(
            "paramstore_shard_replication_lag_entries",
            "Leader: entries committed that the slowest member has not replicated; follower: not yet applied here",
            labels=["node", "shard"],
        )
        for shard, entries in sorted(traffic.replication_lag.items()):
            lag.add_metric([node, str(shard)], entries)
        yield lag
