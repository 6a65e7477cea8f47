"""Parts of a partitioned tensor whose shard this replica does not host (the
replication is below the node count): their writes and reads go over HTTP to
a replica that hosts the shard, as the part `<name>#p<i>` with the caller's
Authorization and the part's request id `<rid>#p<i>`, so a retry through any
replica finds each part's recorded outcome in its shard. One pooled client per
replica (and event loop) carries them, its connections kept alive between
requests; the app closes it on shutdown (`aclose`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from store import dtypes
from store.commands import Delete, Grad, GradRows, Put
from store.errors import StoreError, Unavailable
from store.interface import StoreAPI

from . import headers as h
from . import wire


@dataclass(frozen=True)
class RemotePart:
    """A part read from another replica: what partition_reads needs of a record."""

    version: int
    value: np.ndarray


# (id of the store, id of the event loop) -> that replica's pooled client. Keyed by
# the loop too: an httpx connection belongs to the loop that opened it.
_clients: dict[tuple[int, int], httpx.AsyncClient] = {}


def http_to_replicas(store: StoreAPI) -> httpx.AsyncClient:
    """This process's pooled client to the other replicas (the cluster's TLS CA; closed by `aclose`)."""
    key = (id(store), id(asyncio.get_running_loop()))
    client = _clients.get(key)
    if client is None or client.is_closed:
        verify: Any = store.cfg.tls.client_ca_file or True
        timeout = store.cfg.limits.request_timeout + 5.0
        client = _clients[key] = httpx.AsyncClient(timeout=timeout, verify=verify, follow_redirects=True)
    return client


async def aclose(store: StoreAPI) -> None:
    """Close `store`'s pooled clients (the app's shutdown)."""
    for key in [k for k in _clients if k[0] == id(store)]:
        await _clients.pop(key).aclose()


def is_local(store: StoreAPI, shard: int) -> bool:
    return shard in store.hosted_shards()


def _path(name: str) -> str:
    return "/v1/tensors/" + quote(name, safe="")  # '#' escaped: it is part of the name


def _urls(store: StoreAPI, shard: int) -> list[str]:
    me = store.node.id
    return [n.url for n in store.hosts_of(shard) if n.id != me]


def _error(r: httpx.Response, what: str) -> StoreError:
    try:
        doc = r.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        body = {k: v for k, v in doc.items() if k not in ("status", "path", "request_id")}
        err = StoreError.from_dict(body)
        if err.code != StoreError.code:
            return err
    return Unavailable(f"{what}: the replica hosting it answered HTTP {r.status_code}")


async def _request(
    store: StoreAPI,
    shard: int,
    method: str,
    name: str,
    what: str,
    suffix: str = "",
    body: Body | None = None,
    **kw: Any,
) -> httpx.Response:
    """The first of the shard's hosts that answers (a 307 is followed: it
    names the replica that holds the data); a host that cannot be reached is
    skipped. A 4xx/5xx answer is raised as the peer's own error."""
    client = http_to_replicas(store)
    last = f"{what}: no replica hosting shard {shard} could be reached"
    for url in _urls(store, shard):
        try:
            content = None if body is None else body()
            r = await client.request(method, url + _path(name) + suffix, content=content, **kw)
        except httpx.TransportError as e:
            last = f"{what}: {url} could not be reached ({type(e).__name__})"
            continue
        if r.status_code >= 400:
            raise _error(r, what)
        return r
    raise Unavailable(last)


Body = Callable[[], AsyncIterator[bytes]]


def _body(data: Any) -> tuple[Body, dict[str, str]]:
    """A part's payload sent in chunks (never one copy of a large part on the
    event loop), afresh for each host tried."""
    view = memoryview(data).cast("B")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(view), wire.STREAM_CHUNK):
            yield bytes(view[i : i + wire.STREAM_CHUNK])

    return chunks, {"Content-Length": str(len(view))}


def _auth(auth: str | None) -> dict[str, str]:
    return {"Authorization": auth} if auth else {}


def _tensor_headers(dtype: str, shape: tuple[int, ...]) -> dict[str, str]:
    return {"Content-Type": wire.OCTET, "X-Dtype": dtype, "X-Shape": ",".join(str(d) for d in shape)}


async def write(store: StoreAPI, shard: int, cmd: Any, auth: str | None, what: str) -> dict[str, Any]:
    """One part's Put, Grad or Delete on a replica hosting its shard; the
    answer's body (version, duplicate) as a local write's result."""
    hd = {"Accept": "application/json", h.FORWARDED_PART: "1", **_auth(auth)}
    if cmd.rid is not None:
        hd["X-Request-Id"] = cmd.rid
    if isinstance(cmd, Put):
        if cmd.state_arrays is not None or cmd.state_scalars is not None or cmd.sync is not None:  # no HTTP form
            raise Unavailable(f"{what}: shard {shard} is not hosted here; send it to a replica that hosts it")
        hd.update(_tensor_headers(cmd.dtype, cmd.shape), **{"X-Partitions": "1"})
        if cmd.if_none_match:
            hd["If-None-Match"] = "*"
        if cmd.if_match is not None:
            hd["If-Match"] = "*" if cmd.if_match == "*" else f'"{cmd.if_match}"'
        if cmd.optimizer is not None:
            hd["X-Optimizer"] = json.dumps(cmd.optimizer, separators=(",", ":"))
        if cmd.allow_nonfinite is not None:
            hd["X-Allow-Nonfinite"] = "true" if cmd.allow_nonfinite else "false"
        if cmd.staleness_policy is not None:
            hd["X-Staleness-Policy"] = cmd.staleness_policy
        if cmd.max_staleness is not None:
            hd["X-Max-Staleness"] = str(cmd.max_staleness)
        body, length = _body(cmd.data)
        r = await _request(store, shard, "PUT", cmd.name, what, headers={**hd, **length}, body=body)
    elif isinstance(cmd, Grad):
        hd.update(_tensor_headers(cmd.dtype, cmd.shape))
        if cmd.base_version is not None:
            hd["X-Base-Version"] = str(cmd.base_version)
        if cmd.if_match is not None:
            hd["If-Match"] = f'"{cmd.if_match}"'
        body, length = _body(cmd.data)
        r = await _request(store, shard, "POST", cmd.name, what, "/grad", headers={**hd, **length}, body=body)
    elif isinstance(cmd, GradRows):
        if cmd.base_version is not None:
            hd["X-Base-Version"] = str(cmd.base_version)
        if cmd.if_match is not None:
            hd["If-Match"] = f'"{cmd.if_match}"'
        raw_indices: Any = cmd.indices  # the bytes partition_rows built (never a stored payload here)
        raw_values: Any = cmd.values
        indices = np.frombuffer(raw_indices, dtype=np.int64)
        values = np.frombuffer(raw_values, dtype=dtypes.dtype_of(cmd.dtype)).reshape(cmd.k, *cmd.row_shape)
        body, length = _body(wire.encode_safetensors({"indices": indices, "values": values}, {}))
        hd["Content-Type"] = wire.SAFETENSORS
        r = await _request(store, shard, "POST", cmd.name, what, "/grad-rows", headers={**hd, **length}, body=body)
    elif isinstance(cmd, Delete):
        if cmd.if_match is not None:
            hd["If-Match"] = f'"{cmd.if_match}"'
        r = await _request(store, shard, "DELETE", cmd.name, what, headers=hd)
    else:
        raise Unavailable(f"{what}: shard {shard} is not hosted here; send it to a replica that hosts it")
    result: dict[str, Any] = r.json()
    return result


async def wait_past(store: StoreAPI, shard: int, part: str, version_gt: int, wait_s: float, auth: str | None) -> bool:
    """Whether a part's version passed `version_gt` within `wait_s`: a long
    poll (HEAD, `wait_version_gt`) on a replica hosting its shard."""
    params = {"wait_version_gt": str(version_gt), "timeout": f"{max(wait_s, 0.0):g}"}
    hd = {"Accept": wire.OCTET, **_auth(auth)}
    what = f"wait on part {part!r}"
    timeout = httpx.Timeout(store.cfg.limits.request_timeout + 5.0, read=wait_s + store.cfg.limits.request_timeout)
    r = await _request(store, shard, "HEAD", part, what, headers=hd, params=params, timeout=timeout)
    return r.status_code != 304


async def version_of(store: StoreAPI, shard: int, part: str, auth: str | None) -> int:
    """A part's version on a replica hosting its shard (a HEAD: no body)."""
    hd = {"Accept": wire.OCTET, **_auth(auth)}
    r = await _request(store, shard, "HEAD", part, f"version of part {part!r}", headers=hd)
    return int(r.headers["x-version"])


async def read(
    store: StoreAPI,
    shard: int,
    part: str,
    dtype: str,
    shape: tuple[int, ...],
    auth: str | None,
    *,
    linearizable: bool,
    min_version: int | None,
    deadline: float,
) -> RemotePart:
    """One part's value and version from a replica hosting its shard, read
    with the same consistency the caller asked of the whole tensor."""
    return await _read(store, shard, part, dtype, shape, auth, {}, linearizable, min_version, deadline)


async def read_rows(
    store: StoreAPI,
    shard: int,
    part: str,
    rows: np.ndarray,
    dtype: str,
    row_shape: tuple[int, ...],
    auth: str | None,
    *,
    linearizable: bool,
    min_version: int | None,
    deadline: float,
) -> RemotePart:
    """Rows of one part from a replica hosting its shard (`rows` within the part)."""
    params = {"rows": ",".join(str(int(r)) for r in rows)}
    shape = (len(rows), *row_shape)
    return await _read(store, shard, part, dtype, shape, auth, params, linearizable, min_version, deadline)


async def _read(
    store: StoreAPI,
    shard: int,
    part: str,
    dtype: str,
    shape: tuple[int, ...],
    auth: str | None,
    params: dict[str, str],
    linearizable: bool,
    min_version: int | None,
    deadline: float,
) -> RemotePart:
    if linearizable:
        params["consistency"] = "linearizable"
    if min_version is not None:
        params["min_version"] = str(min_version)
        params["timeout"] = f"{deadline:g}"
    hd = {"Accept": wire.OCTET, **_auth(auth)}
    what = f"read of part {part!r}"
    r = await _request(store, shard, "GET", part, what, headers=hd, params=params)
    want = dtypes.expected_nbytes(dtype, shape)
    if len(r.content) != want:
        raise Unavailable(f"{what}: the replica hosting it sent {len(r.content)} bytes, not {want}")
    value = np.frombuffer(r.content, dtype=dtypes.dtype_of(dtype)).reshape(shape)
    return RemotePart(int(r.headers["x-version"]), value)
