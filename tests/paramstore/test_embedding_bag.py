"""StoreEmbeddingBag on the folder's real 3-replica cluster (2 shards): the same
forward output and rows after one step as torch.nn.EmbeddingBag + the torch
optimizer; the worker cache's staleness bound and hit rate; prefetch; failed
pipelined pushes raised on the next step and retried without applying twice."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from paramstore import Client, UnavailableError
from paramstore._table_shards import shard_of_ids
from paramstore.torch import PrefetchingLoader, PushFailed, StoreEmbeddingBag
from store.tables.ids import shard_of_keys, table_keys
from tests.paramstore.devcluster import DevCluster
from tests.waiting import wait_until

_names = itertools.count()


def fresh(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


def batch(seed: int, n: int = 40) -> np.ndarray:
    """Unbounded, duplicate-heavy IDs (negative and > 2**40 included)."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([rng.integers(-(2**62), 2**62, 12), np.arange(5)])
    return pool[rng.zipf(1.4, n) % len(pool)].astype(np.int64)


def test_the_client_places_ids_on_the_shards_the_store_does() -> None:
    ids = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 10_000, dtype=np.int64)
    for shards in (1, 2, 3, 7):
        assert np.array_equal(shard_of_ids(ids, shards), shard_of_keys(table_keys(ids, "int64"), shards))


CASES = [
    ("sgd", {"lr": 0.5}, "sum", True),
    ("sgd", {"lr": 0.5}, "mean", False),
    ("sgd", {"lr": 0.5}, "max", False),
    ("adagrad", {"lr": 0.3}, "mean", False),
    ("adagrad", {"lr": 0.3}, "sum", True),
    ("sparse_adam", {"lr": 0.05}, "sum", False),
    ("sparse_adam", {"lr": 0.05}, "mean", False),
]


def torch_optimizer(kind: str, params: list[torch.Tensor], hp: dict[str, float]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, **hp)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, **hp)
    return torch.optim.SparseAdam(params, **hp)


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's sparse Adagrad says so
@pytest.mark.parametrize(("kind", "hp", "mode", "weighted"), CASES)
def test_forward_and_one_step_match_torch_embedding_bag(
    ps: Client, kind: str, hp: dict[str, float], mode: str, weighted: bool
) -> None:
    name = fresh(f"bag_{kind}_{mode}")
    dim = 8
    ps.create_table(name, dim=dim, optimizer={"type": kind, **hp}, initializer={"type": "normal", "std": 0.3})
    ids = batch(len(name))
    offsets = torch.tensor([0, 3, 3, 11, 20, 33])  # an empty bag included
    distinct = np.unique(ids)
    start = np.array(ps.lookup(name, distinct))

    local = torch.nn.EmbeddingBag(len(distinct), dim, mode=mode, sparse=mode != "max")  # torch: no sparse max
    with torch.no_grad():
        local.weight.copy_(torch.from_numpy(start))
    local_input = torch.from_numpy(np.searchsorted(distinct, ids))
    bag = StoreEmbeddingBag(ps, name, mode=mode)
    try:
        rng = np.random.default_rng(1)
        target = torch.from_numpy(rng.normal(0, 1, (len(offsets), dim)).astype(np.float32))
        w = torch.from_numpy(rng.uniform(0.5, 2, len(ids)).astype(np.float32)) if weighted else None
        w_local = w.clone().requires_grad_() if w is not None else None
        w_store = w.clone().requires_grad_() if w is not None else None

        out_local = local(local_input, offsets, per_sample_weights=w_local)
        out_store = bag(torch.from_numpy(ids), offsets, per_sample_weights=w_store)
        np.testing.assert_allclose(out_store.detach().numpy(), out_local.detach().numpy(), rtol=0, atol=1e-6)

        opt = torch_optimizer(kind, list(local.parameters()), hp)
        (out_local * target).sum().backward()
        opt.step()
        (out_store * target).sum().backward()  # pushes the row gradients
        if w_local is not None and w_store is not None:
            assert w_local.grad is not None and w_store.grad is not None
            np.testing.assert_allclose(w_store.grad.numpy(), w_local.grad.numpy(), rtol=0, atol=1e-6)

        after = np.array(ps.lookup(name, distinct, consistency="linearizable"))
        expect = local.weight.detach().numpy()
        assert not np.allclose(after, start)  # the step changed rows
        np.testing.assert_allclose(after, expect, rtol=0, atol=1e-6)
        assert bag.stats()["pushes"] == 1
    finally:
        bag.close()


@pytest.mark.cluster
def test_two_dimensional_input_without_offsets_and_eval_mode_pushes_nothing(ps: Client) -> None:
    name = fresh("bag2d")
    ps.create_table(name, dim=4, initializer={"type": "uniform", "bound": 1.0})
    ids = torch.tensor([[5, 9, 9], [-2, 5, 7]])
    bag = StoreEmbeddingBag(ps, name, mode="sum")
    try:
        rows = {int(i): ps.lookup(name, np.array([i]))[0] for i in (5, 9, -2, 7)}
        bag.eval()
        out = bag(ids)
        expect = np.stack([rows[5] + 2 * rows[9], rows[-2] + rows[5] + rows[7]])
        np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-6)
        assert not out.requires_grad and bag.stats()["pushes"] == 0
        assert ps.table_info(name)["version"] == 0
    finally:
        bag.close()


@pytest.mark.cluster
def test_include_last_offset_int32_offsets_and_a_cache_bounded_in_bytes(ps: Client) -> None:
    name = fresh("lastoff")
    ps.create_table(name, dim=4, initializer={"type": "uniform", "bound": 1.0})
    ids = torch.tensor([3, -4, 3, 8, 9], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    distinct = np.unique(ids.numpy())
    local = torch.nn.EmbeddingBag(len(distinct), 4, mode="mean", include_last_offset=True)
    with torch.no_grad():
        local.weight.copy_(torch.from_numpy(np.array(ps.lookup(name, distinct))))
    expect = local(torch.from_numpy(np.searchsorted(distinct, ids.numpy())), offsets.long())
    bag = StoreEmbeddingBag(ps, name, mode="mean", include_last_offset=True, cache_bytes=10 * (16 + 40))
    try:
        bag.eval()
        out = bag(ids, offsets)
        assert out.shape == (2, 4)
        np.testing.assert_allclose(out.numpy(), expect.detach().numpy(), rtol=0, atol=1e-6)
        assert bag.fetcher.cache is not None and bag.fetcher.cache.max_rows == 10
    finally:
        bag.close()


def one_shard_ids(ps: Client, name: str, n: int, shard: int, start: int = 1000) -> list[int]:
    shards = len(ps.table_info(name)["shards"])
    candidates = np.arange(start, start + 50 * n, dtype=np.int64)
    return candidates[shard_of_ids(candidates, shards) == shard][:n].tolist()


@pytest.mark.cluster
def test_cached_rows_are_refetched_once_another_workers_updates_pass_the_bound(ps: Client) -> None:
    name = fresh("cached")
    ps.create_table(name, dim=4, optimizer={"type": "sgd", "lr": 1.0})
    x, y, z = one_shard_ids(ps, name, 3, shard=0)
    bag = StoreEmbeddingBag(ps, name, mode="sum", cache_rows=100, max_staleness=5)
    bag.eval()  # this worker only reads; "another worker" (ps) pushes
    try:
        before = bag(torch.tensor([[x]]))[0].numpy().copy()
        for _ in range(3):  # shard 0 moves 3 versions ahead
            ps.push_rows(name, [x], np.ones((1, 4), np.float32))
        # y is not cached: its lookup shows shard 0 three versions ahead; x stays within the bound
        out = bag(torch.tensor([[x], [y]]))
        np.testing.assert_array_equal(out[0].numpy(), before)
        s = bag.stats()
        assert (s["hits"], s["misses"], s["stale"]) == (1, 2, 0)
        for _ in range(3):  # 6 versions past the read of x: beyond the bound, but not known yet
            ps.push_rows(name, [x], np.ones((1, 4), np.float32))
        out = bag(torch.tensor([[x], [z]]))  # x is judged by what the worker knew when the batch began
        np.testing.assert_array_equal(out[0].numpy(), before)
        out = bag(torch.tensor([[x]]))  # z's lookup showed shard 0 six versions on: x is fetched again
        np.testing.assert_array_equal(out[0].numpy(), before - 6.0)  # the other worker's 6 updates
        s = bag.stats()
        assert (s["hits"], s["misses"], s["stale"]) == (2, 4, 1)
        assert bag.hit_rate == pytest.approx(2 / 6)
    finally:
        bag.close()


@pytest.mark.cluster
def test_own_pushes_count_against_the_bound_and_a_small_cache_evicts_least_recent(ps: Client) -> None:
    name = fresh("own")
    ps.create_table(name, dim=2, optimizer={"type": "sgd", "lr": 1.0})
    bag = StoreEmbeddingBag(ps, name, mode="sum", cache_rows=3, max_staleness=0)
    try:
        ids = torch.tensor([1, 2, 3])
        bag(ids, torch.tensor([0])).sum().backward()  # pushes: every shard it touched moves on
        out = bag(ids, torch.tensor([0]))  # bound 0: the cached rows are stale, read again
        assert bag.stats()["hits"] == 0 and bag.stats()["stale"] == 3
        np.testing.assert_allclose(out.detach().numpy(), ps.lookup(name, [1, 2, 3]).sum(0)[None], atol=1e-6)
        bag.eval()
        bag(torch.tensor([4, 5]), torch.tensor([0]))  # evicts the two least recently used of 1, 2, 3
        assert len(bag.fetcher.cache or []) == 3
    finally:
        bag.close()


@pytest.mark.cluster
def test_prefetching_loader_fills_the_cache_ahead_of_each_batch(ps: Client) -> None:
    name = fresh("prefetch")
    ps.create_table(name, dim=4)
    batches = [torch.tensor([[i, i + 1, 100]]) for i in range(0, 40, 10)]  # disjoint but for 100
    bag = StoreEmbeddingBag(ps, name, mode="mean", cache_rows=1000, max_staleness=0)
    bag.eval()
    try:
        for b in PrefetchingLoader(batches, bag, ids_of=lambda b: b):
            bag(b)
        s = bag.stats()
        # forward found every row in the cache; the prefetches fetched each distinct ID once
        assert s["rows_fetched"] == 9 and s["hits"] == 4 * 3 + 3  # 100 also hits when prefetched again
        with pytest.raises(ValueError, match="cache"):
            StoreEmbeddingBag(ps, name).prefetch(batches[0])
    finally:
        bag.close()


class FlakyProxy:
    """An HTTP proxy in front of one real replica; while `failing`, table pushes
    are forwarded (and applied) but answered 503, as when a replica applies a
    write and its answer is lost."""

    def __init__(self, upstream: str) -> None:
        self.failing = False
        self.pushes_seen: list[str] = []
        proxy = self
        client = httpx.Client(base_url=upstream, timeout=10.0)
        self.client = client

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = client.request(self.command, self.path, headers=headers, content=body)
                status, out, kind = r.status_code, r.content, r.headers.get("content-type", "")
                if self.path.endswith(":push"):
                    proxy.pushes_seen.append(self.headers.get("X-Request-Id", ""))
                    if proxy.failing:
                        status, kind = 503, "application/json"
                        out = json.dumps({"error": "unavailable", "detail": "test proxy lost the answer"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(out)))
                for k in ("X-Versions", "X-Dtype"):
                    if k in r.headers:
                        self.send_header(k, r.headers[k])
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@pytest.fixture
def proxy(cluster: DevCluster) -> Iterator[FlakyProxy]:
    p = FlakyProxy(cluster.urls[0])
    yield p
    p.close()


@pytest.mark.cluster
@pytest.mark.parametrize("in_flight", [0, 2])
def test_a_failed_push_is_raised_on_the_next_step_and_retried_once_only(
    ps: Client, proxy: FlakyProxy, in_flight: int
) -> None:
    name = fresh("flaky")
    ps.create_table(name, dim=2, optimizer={"type": "sgd", "lr": 1.0}, initializer={"type": "zeros"})
    ids = torch.tensor([7, 8, 8])
    with Client([proxy.url], timeout=2.0, deadline=0.6) as through_proxy:
        bag = StoreEmbeddingBag(through_proxy, name, mode="sum", max_in_flight=in_flight)
        try:
            proxy.failing = True
            out: Any = bag(ids, torch.tensor([0]))
            if in_flight == 0:  # a synchronous push raises at once
                with pytest.raises(PushFailed) as raised:
                    out.sum().backward()
            else:  # the push runs in the background; the first step after it failed raises
                out.sum().backward()
                wait_until(lambda: bag.pushes.failed, 10, "the background push to fail")
                with pytest.raises(PushFailed) as raised:
                    bag(ids, torch.tensor([0]))
            assert isinstance(raised.value.__cause__, UnavailableError)
            assert len(raised.value.failed) == 1
            with pytest.raises(PushFailed):  # raised again until retried or discarded
                bag(ids, torch.tensor([0]))
            rid = raised.value.failed[0].request_id
            assert proxy.pushes_seen and set(proxy.pushes_seen) == {rid}
            # the store applied the push although the answer was lost; the retry must not apply it again
            proxy.failing = False
            bag.retry_pushes()
            assert set(proxy.pushes_seen) == {rid}
            rows = ps.lookup(name, [7, 8], consistency="linearizable")
            np.testing.assert_array_equal(rows, [[-1.0, -1.0], [-2.0, -2.0]])
            bag(ids, torch.tensor([0]))  # steps work again
        finally:
            bag.close()
