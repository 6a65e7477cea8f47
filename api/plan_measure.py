"""`paramstore plan --measure URL`: push and pull throughput of one client
against a running cluster, and the cluster's real shard placement."""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from paramstore import Client
from store.placement import shard_for


@dataclass(frozen=True)
class Placement:
    """What /v1/cluster says: node ids, shard count, replication, and the
    share of the stored bytes (of the shards, if nothing is stored) each node
    leads and hosts."""

    nodes: tuple[str, ...]
    shards: int
    replication: int
    lead_shares: tuple[float, ...]
    host_shares: tuple[float, ...]


@dataclass(frozen=True)
class Measured:
    push_bytes_per_s: float
    pull_bytes_per_s: float
    probe_bytes: int
    rounds: int
    placement: Placement


def placement(doc: dict[str, Any]) -> Placement:
    shards = doc["shards"]
    nodes = sorted({r for s in shards for r in s["replicas"]})
    weights = [float(s.get("bytes") or 0) for s in shards]
    if sum(weights) <= 0:  # nothing stored (or shards not hosted by the answering replica): by count
        weights = [1.0] * len(shards)
    total = sum(weights)
    lead = dict.fromkeys(nodes, 0.0)
    host = dict.fromkeys(nodes, 0.0)
    for s, w in zip(shards, weights, strict=True):
        for r in s["replicas"]:
            host[r] += w / total
        # A shard whose leader this replica does not know: count its first replica.
        leader = s.get("leader") or s["replicas"][0]
        if leader in lead:
            lead[leader] += w / total
    return Placement(
        tuple(nodes),
        len(shards),
        int(doc["replication"]),
        tuple(lead[n] for n in nodes),
        tuple(host[n] for n in nodes),
    )


def probe_name(doc: dict[str, Any]) -> str:
    """A fresh tensor name whose shard the answering replica hosts: no 307 to
    another replica, whose hop would be timed with the probe."""
    hosted = {s["shard"] for s in doc["shards"] if doc["node"] in s["replicas"]}
    while True:
        name = f"_plan_probe_{uuid.uuid4().hex[:12]}"
        if not hosted or shard_for(name, len(doc["shards"])) in hosted:
            return name


def measure(urls: list[str], probe_bytes: int, rounds: int = 3, token: str | None = None) -> Measured:
    """Create a float32 probe tensor of `probe_bytes` (optimizer `assign`: a push
    stores the gradient, no arithmetic), time `rounds` pushes (committed on a
    majority) and `rounds` pulls, delete it. Rates are bytes / median time."""
    n = max(1, probe_bytes // 4)
    data = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    with Client(urls, timeout=120.0, deadline=300.0, token=token) as client:
        doc = client.cluster()
        where = placement(doc)  # before the probe adds its own bytes
        name = probe_name(doc)
        client.create(name, data, optimizer={"type": "assign"})
        try:
            pushes, pulls = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                client.push_grad(name, data)
                pushes.append(time.perf_counter() - t0)
            for _ in range(rounds):
                t0 = time.perf_counter()
                value, _version = client.pull(name)
                pulls.append(time.perf_counter() - t0)
                del value
        finally:
            client.delete(name)
    nbytes = n * 4
    return Measured(nbytes / statistics.median(pushes), nbytes / statistics.median(pulls), nbytes, rounds, where)
