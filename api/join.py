"""`paramstore serve --join URL`: become a replica of a running cluster.

1. ask the seed (and, for shards it does not host, one of their replicas)
   for `/v1/cluster`: each shard's members, their addresses, its leader;
2. the Store downloads a fresh snapshot of each shard from its leader over
   the data path and starts its replicas, which wait without campaigning;
3. register: `POST /v1/cluster/members` on a replica of each shard, which
   adds this node through the Raft log; the leader then sends only the
   entries after the snapshot.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from store import membership
from store.config import Config, NodeConfig
from store.errors import ConfigError, StoreError, Unavailable

log = logging.getLogger(__name__)


def _client(cfg: Config, timeout: float) -> httpx.Client:
    headers = {}
    tokens = cfg.auth.write_tokens
    if tokens:
        headers["Authorization"] = f"Bearer {tokens[0]}"
    return httpx.Client(timeout=timeout, headers=headers, verify=cfg.tls.client_ca_file or True)


def _status(client: httpx.Client, url: str) -> dict[str, Any]:
    try:
        r = client.get(url.rstrip("/") + "/v1/cluster")
    except httpx.HTTPError as e:
        raise Unavailable(f"join: cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise Unavailable(f"join: {url}/v1/cluster answered {r.status_code}: {r.text[:200]}")
    doc: dict[str, Any] = r.json()
    return doc


def plan_join(cfg: Config, seeds: list[str], deadline_seconds: float = 60.0) -> membership.JoinPlan:
    """Members and snapshot source of every shard, as the cluster reports them.
    Waits (to the deadline) for every shard to have a leader."""
    deadline = time.monotonic() + deadline_seconds
    with _client(cfg, 10.0) as client:
        while True:
            try:
                return _plan(cfg, client, seeds)
            except Unavailable as e:
                if time.monotonic() > deadline:
                    raise
                log.info("%s; retrying", e.detail)
                time.sleep(1.0)


def _plan(cfg: Config, client: httpx.Client, seeds: list[str]) -> membership.JoinPlan:
    docs: dict[str, dict[str, Any]] = {}
    last_error: StoreError | None = None
    for url in seeds:
        try:
            docs[url] = _status(client, url)
            break
        except Unavailable as e:
            last_error = e
    if not docs:
        raise last_error or Unavailable("join: no seed given")
    seed = next(iter(docs.values()))
    shards: dict[int, tuple[NodeConfig, ...]] = {}
    sources: dict[int, NodeConfig] = {}
    for entry in seed["shards"]:
        shard = entry["shard"]
        doc = next((d for d in docs.values() if _hosted(d, shard)), None)
        if doc is None:
            nodes = _nodes(seed)
            replica = next((nodes[i].url for i in entry["replicas"] if i in nodes), None)
            if replica is None:
                raise Unavailable(f"join: no reachable replica of shard {shard}")
            doc = docs[replica] = _status(client, replica)
        nodes = _nodes(doc)
        info = next(s for s in doc["shards"] if s["shard"] == shard)
        if info.get("leader") not in nodes:
            raise Unavailable(f"join: shard {shard} has no leader right now")
        if cfg.node_id is not None and cfg.node_id in info["replicas"] and nodes.get(cfg.node_id) != cfg.node:
            raise ConfigError(
                f"join: {cfg.node_id!r} is already a member of shard {shard} with other "
                "addresses; remove it first (`paramstore cluster remove`)"
            )
        shards[shard] = tuple(nodes[i] for i in info["replicas"] if i in nodes)
        sources[shard] = nodes[info["leader"]]
    return membership.JoinPlan(shards, sources)


def _hosted(doc: dict[str, Any], shard: int) -> bool:
    return any(s["shard"] == shard and "leader" in s for s in doc["shards"])


def _nodes(doc: dict[str, Any]) -> dict[str, NodeConfig]:
    return {n["id"]: membership.node_of(n) for n in doc["nodes"]}


def register(cfg: Config, plan: membership.JoinPlan, timeout: float = 120.0) -> None:
    """Ask a replica of each shard to add this node (idempotent: safe to repeat)."""
    me = membership.record_of(cfg.node)
    by_url: dict[str, list[int]] = {}
    for shard in plan.shards:
        by_url.setdefault(plan.snapshot_sources[shard].url, []).append(shard)
    with _client(cfg, timeout) as client:
        for url, shards in sorted(by_url.items()):
            started = time.monotonic()
            try:
                r = client.post(url + "/v1/cluster/members", json=dict(me, shards=sorted(shards)))
            except httpx.HTTPError as e:
                raise Unavailable(f"join: registering with {url} failed: {e}") from None
            if r.status_code != 200:
                raise Unavailable(f"join: {url} refused to add {cfg.node_id}: {r.status_code} {r.text[:300]}")
            log.info("join: added to shards %s via %s in %.2fs", shards, url, time.monotonic() - started)
