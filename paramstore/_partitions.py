"""Partitioned tensors in the client (docs/api.md, "Partitioned tensors"):
once the client knows a tensor's parts, `push_grad` and `pull` talk to the
parts directly (`/v1/tensors/<name>%23p<i>`), in parallel, each to a replica
of the part's shard (its leader when this client knows its URL), instead of
sending the whole tensor through one replica."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from ._errors import InvalidError, NotFoundError, ParamStoreError
from ._transport import Transport
from ._wire import OCTET, array_from, le_contiguous, tensor_request, version_of

MAX_PARALLEL = 16


@dataclass(frozen=True)
class PartLayout:
    shape: tuple[int, ...]
    rows: tuple[tuple[int, int], ...]  # [start, stop) of each part
    replicas: tuple[int | None, ...]  # index in the client's URLs of a replica to try first, per part


class PartitionMethods:
    """Mixed into `Client`."""

    _transport: Transport
    _lock: threading.Lock
    session: dict[str, int]
    _layouts: dict[str, PartLayout]
    _pool: ThreadPoolExecutor | None

    # ---- what the client knows of a tensor's parts ---------------------------------
    def _learn_parts(self, name: str, shape: tuple[int, ...], parts: list[dict[str, Any]]) -> None:
        leaders = self._leader_urls()
        rows = tuple((int(p["rows"][0]), int(p["rows"][1])) for p in parts)
        replicas = tuple(leaders.get(int(p["shard"])) for p in parts)
        with self._lock:
            self._layouts[name] = PartLayout(tuple(shape), rows, replicas)

    def _learn_from(self, name: str, r: httpx.Response) -> None:
        """From a whole tensor's answer: its X-Partitions header, if partitioned."""
        described = r.headers.get("X-Partitions")
        if described is None or name in self._layouts:
            return
        text = r.headers["X-Shape"].strip()
        self._learn_parts(name, tuple(int(d) for d in text.split(",") if d.strip()), json.loads(described))

    def _leader_urls(self) -> dict[int, int]:
        """shard -> index of the client URL of its leader, where known."""
        try:
            doc = self._transport.request("GET", "/v1/cluster").json()
        except ParamStoreError:
            return {}
        by_node = {n["id"]: n["url"].rstrip("/") for n in doc.get("nodes", [])}
        urls = [u.rstrip("/") for u in self._transport.urls]
        out = {}
        for s in doc.get("shards", []):
            url = by_node.get(s.get("leader") or "")
            if url in urls:
                out[int(s["shard"])] = urls.index(url)
        return out

    def _forget_parts(self, name: str) -> None:
        with self._lock:
            self._layouts.pop(name, None)

    # ---- parallel part requests ------------------------------------------------------
    def _parallel(self, name: str, what: str, calls: list[Any]) -> list[httpx.Response]:
        """Run one call per part concurrently; all answers in part order, or the
        first failure naming the failed parts and listing those that applied."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="paramstore-part")
        futures: list[Future[httpx.Response]] = [self._pool.submit(c) for c in calls]
        answers: list[httpx.Response | None] = []
        failed: list[tuple[int, ParamStoreError]] = []
        for i, f in enumerate(futures):
            try:
                answers.append(f.result())
            except ParamStoreError as e:
                answers.append(None)
                failed.append((i, e))
        if not failed:
            return [a for a in answers if a is not None]
        i, first = failed[0]
        applied = [{"part": j, "version": version_of(a)} for j, a in enumerate(answers) if a is not None]
        body = dict(first.body, failed=[{"part": j, "code": e.code} for j, e in failed], applied=applied)
        names = ", ".join(f"part {j}" for j, _ in failed)
        raise type(first)(
            f"{what} of {name!r}: {names} failed, {len(applied)} of {len(calls)} applied; part {i}: {first.detail}",
            status=first.status,
            code=first.code,
            body=body,
        ) from first

    def _push_parts(self, name: str, lay: PartLayout, grad: Any, base_version: int | None) -> int:
        arr = le_contiguous(grad)
        if tuple(arr.shape) != lay.shape:  # nothing sent, no part applied
            raise InvalidError(f"gradient shape {list(arr.shape)} does not match {name!r}'s {list(lay.shape)}")

        def call(i: int) -> Any:
            a, b = lay.rows[i]
            body, headers = tensor_request(arr[a:b])
            if base_version is not None:
                headers["X-Base-Version"] = str(int(base_version))
            return lambda: self._transport.request(
                "POST", _part_path(name, i) + "/grad", headers=headers, content=body, write=True, first=lay.replicas[i]
            )

        answers = self._parallel(name, "push", [call(i) for i in range(len(lay.rows))])
        return min(version_of(r) for r in answers)

    def _pull_parts(self, name: str, lay: PartLayout) -> tuple[np.ndarray, int]:
        seen = self.session.get(name)
        params = {"min_version": seen, "timeout": max(0.5, self._transport.timeout / 2)} if seen is not None else {}

        def call(i: int) -> Any:
            return lambda: self._transport.request(
                "GET", _part_path(name, i), params=params, headers={"Accept": OCTET}, first=lay.replicas[i]
            )

        answers = self._parallel(name, "pull", [call(i) for i in range(len(lay.rows))])
        value = np.concatenate([array_from(r) for r in answers], axis=0)
        return value, min(version_of(r) for r in answers)

    def _with_parts(self, name: str, fn: Any) -> Any:
        """`fn(layout)` if the client knows `name`'s parts, else None; a part
        that is gone (the tensor was deleted or re-created) forgets them."""
        lay = self._layouts.get(name)
        if lay is None:
            return None
        try:
            return fn(lay)
        except NotFoundError:
            self._forget_parts(name)
            return None


def _part_path(name: str, i: int) -> str:
    return f"/v1/tensors/{name}%23p{i}"  # '#' escaped: the part's name is <name>#p<i>
