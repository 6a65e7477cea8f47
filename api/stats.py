"""`GET /v1/stats`: this replica's counters as JSON, for /ui's charts.

Counters since start (requests, bytes per route and per peer link, table
lookups and pushes), never rates: the page keeps its own ring buffer of polls
and derives rates from consecutive ones, so the server keeps no history and
no sampling thread. `?cluster=1` adds every other replica's answer (asked by
this replica, with the caller's token), so one page charts them all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, Query, Request

from store.interface import StoreAPI
from store.traffic import quantile

from . import openapi as oa
from . import part_forward

router = APIRouter()

COMMIT_WINDOW = 5.0  # seconds of commits behind the p50/p99 of one poll
PEER_TIMEOUT = 1.5  # a replica that does not answer within it is shown as unreachable
# (method, route template) of the requests the page counts as pushes and pulls
PUSHES = frozenset(
    {
        ("POST", "/v1/tensors/{name}/grad"),
        ("POST", "/v1/tensors/{name}/grad-rows"),
        ("POST", "/v1/grads:batch"),
        ("POST", "/v1/tables/{name:table}:push"),
    }
)
PULLS = frozenset(
    {
        ("GET", "/v1/tensors/{name}"),
        ("GET", "/v1/tensors:batch"),
        ("POST", "/v1/tensors:batch"),
        ("POST", "/v1/tables/{name:table}:lookup"),
    }
)


def local_stats(request: Request) -> dict[str, Any]:
    store: StoreAPI = request.app.state.store
    traffic = store.traffic(COMMIT_WINDOW)
    routes = [
        {"method": m, "route": r, "requests": c[0], "bytes_in": c[1], "bytes_out": c[2]}
        for (m, r), c in sorted(request.app.state.http_metrics.totals.items())
    ]
    kind = {**dict.fromkeys(PUSHES, "pushes"), **dict.fromkeys(PULLS, "pulls")}
    counts = {"pushes": 0, "pulls": 0}
    for r in routes:
        k = kind.get((r["method"], r["route"]))
        if k:
            counts[k] += r["requests"]
    shards = [
        {
            "shard": s.shard,
            "role": s.role,
            "leader": s.leader,
            "term": s.term,
            "leader_changes": s.leader_changes,
            "replication_lag": traffic.replication_lag.get(s.shard, 0),
        }
        for s in store.shard_stats()
    ]
    service = store.tables
    served = dict(service.served)
    tables = []
    for info in service.list():
        lookups, lookup_rows, pushes, push_rows = served.get(info["name"], [0, 0, 0, 0])
        hits, misses = service.cache_hits(info["name"])
        row_hits, row_misses = service.row_cache_hits(info["name"])
        tables.append(
            {
                **{k: info[k] for k in ("name", "rows", "bytes_in_memory", "bytes_on_disk", "refused", "evicted")},
                "lookups": lookups,
                "lookup_rows": lookup_rows,
                "pushes": pushes,
                "push_rows": push_rows,
                "cache_hits": hits,
                "cache_misses": misses,
                "row_cache_hits": row_hits,
                "row_cache_misses": row_misses,
            }
        )
    budget = service.budget
    return {
        "node": store.node.id,
        "time": time.time(),
        "http": {**counts, "routes": routes},
        "links": [
            {"channel": link.channel, "peer": link.peer, "bytes_in": link.received, "bytes_out": link.sent}
            for link in traffic.links
        ],
        "commit": {
            "count": traffic.commits,
            "window_seconds": COMMIT_WINDOW,
            "samples": len(traffic.commit_seconds),
            "p50": quantile(traffic.commit_seconds, 0.5),
            "p99": quantile(traffic.commit_seconds, 0.99),
        },
        "shards": shards,
        "tables": tables,
        "table_cache": None if budget is None else {"capacity": budget.cache_bytes, "usage": budget.usage()},
    }


async def peer_stats(client: httpx.AsyncClient, node: str, url: str, headers: dict[str, str]) -> dict[str, Any]:
    try:
        r = await client.get(url.rstrip("/") + "/v1/stats", headers=headers, timeout=PEER_TIMEOUT)
        if r.status_code != 200:
            return {"node": node, "error": f"HTTP {r.status_code}"}
        body: dict[str, Any] = r.json()
        return body
    except (httpx.HTTPError, ValueError) as e:
        return {"node": node, "error": type(e).__name__}


@router.get(
    "/v1/stats", responses=oa.json_ok(oa.OBJECT, "This replica's counters (and with cluster=1, every replica's)")
)
async def stats(request: Request, cluster: bool = Query(False)) -> dict[str, Any]:
    # table figures read RocksDB properties and directory sizes: off the event loop
    here = await asyncio.to_thread(local_stats, request)
    if not cluster:
        return here
    store: StoreAPI = request.app.state.store
    auth = request.headers.get("authorization")
    headers = {"Accept": "application/json", **({"Authorization": auth} if auth else {})}
    # every replica hosting some shard (with replication below the node count, not only this one's peers)
    others = {n.id: n.url for s in range(store.cfg.shards) for n in store.hosts_of(s) if n.id != here["node"]}
    client = part_forward.http_to_replicas(store)
    answers = await asyncio.gather(*(peer_stats(client, node, url, headers) for node, url in sorted(others.items())))
    return {"replicas": [here, *answers]}
