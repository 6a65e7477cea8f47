"""`StoreEmbeddingBag`: torch.nn.EmbeddingBag whose rows live in a paramstore table.

Forward deduplicates the batch's IDs, gets their rows (worker cache, then one
lookup per shard touched, concurrently), and runs torch's own embedding_bag
over those rows, so sum / mean / max and per_sample_weights behave exactly as
in torch. Backward yields the gradient of each distinct ID's row and pushes it
(`push_rows`); the table's row-wise optimizer applies it in the store.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.nn import functional as F

from ._pushes import FailedPush, PushPipeline
from ._rowfetch import RowFetcher

T = TypeVar("T")


class _PushRowGrads(torch.autograd.Function):
    """Identity on the batch's rows; backward pushes their gradient instead of
    accumulating it anywhere local."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, push: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.push = push
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        ctx.push(grad)
        return None, None


class StoreEmbeddingBag(torch.nn.Module):
    """`torch.nn.EmbeddingBag(input, offsets, per_sample_weights)` over table `table`.

    `cache_rows` / `cache_bytes`: bound of the worker's LRU row cache (0: no
    cache). `max_staleness`: a cached row is used only while the newest
    version this worker has seen of its shard is at most this many versions
    past the one it was read at (docs/embeddings.md). `max_in_flight`: row
    pushes running in the background (0: backward waits for its push).
    IDs are int64 tensors (a uint64 table's IDs up to 2**63-1). The module
    has no parameters: the rows are the table's, updated by its optimizer.
    """

    def __init__(
        self,
        client: Any,
        table: str,
        mode: str = "mean",
        *,
        cache_rows: int = 0,
        cache_bytes: int | None = None,
        max_staleness: int = 0,
        max_in_flight: int = 0,
        include_last_offset: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', not {mode!r}")
        self.table = table
        self.mode = mode
        self.include_last_offset = include_last_offset
        self.fetcher = RowFetcher(client, table, cache_rows, max_staleness, cache_bytes)
        self.embedding_dim = self.fetcher.dim
        self.pushes = PushPipeline(client, table, max_in_flight, on_result=self.fetcher.observe_push)
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paramstore-prefetch")
        self._prefetching: deque[Future[np.ndarray]] = deque()
        self._prefetch_lock = threading.Lock()

    # ---- forward / backward -----------------------------------------------------------
    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.pushes.check()  # a failed push of an earlier step surfaces here
        self._await_prefetch()
        ids, inverse = torch.unique(input.reshape(-1), return_inverse=True)
        ids_np = ids.cpu().numpy().astype(np.int64, copy=False)
        rows = torch.from_numpy(self.fetcher.fetch(ids_np))
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_()
            weight = _PushRowGrads.apply(rows, lambda g: self._push(ids_np, g))  # type: ignore[no-untyped-call]
        else:
            weight = rows
        return F.embedding_bag(
            inverse.reshape(input.shape),
            weight.to(input.device),
            None if offsets is None else offsets.to(torch.long),  # inverse is int64: offsets must match
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
        )

    def _push(self, ids: np.ndarray, grad: torch.Tensor) -> None:
        self.pushes.submit(ids, grad.detach().to(torch.float32).contiguous().cpu().numpy())

    # ---- prefetch ---------------------------------------------------------------------
    def prefetch(self, input: torch.Tensor) -> None:
        """Start fetching a coming batch's rows into the cache on a background
        thread. Prefetches run in order; each forward first waits for the
        oldest one still pending (its own batch's, when called once per batch
        ahead, as `PrefetchingLoader` does)."""
        if self.fetcher.cache is None:
            raise ValueError("prefetch fills the row cache: create the module with cache_rows or cache_bytes")
        ids = torch.unique(input.reshape(-1)).cpu().numpy().astype(np.int64, copy=False)
        with self._prefetch_lock:
            self._prefetching.append(self._prefetcher.submit(self.fetcher.fetch, ids))

    def _await_prefetch(self) -> None:
        with self._prefetch_lock:
            pending = self._prefetching.popleft() if self._prefetching else None
        if pending is not None:
            pending.result()  # a failed prefetch raises here, on the step that needed it

    # ---- pushes -----------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every push in flight; raises `PushFailed` if one failed."""
        self.pushes.flush()

    def retry_pushes(self) -> None:
        """Send failed pushes again with their request ids (applied at most once)."""
        self.pushes.retry()

    def discard_failed_pushes(self) -> list[FailedPush]:
        return self.pushes.discard_failed()

    def close(self) -> None:
        """Wait for prefetches and pushes; stop the threads (does not raise for failed pushes)."""
        try:
            while self._prefetching:
                self._await_prefetch()
        finally:
            self._prefetcher.shutdown(wait=True)
            self.pushes.close()
            self.fetcher.close()

    # ---- figures ----------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        """Share of distinct IDs per batch served by the cache (0 without one)."""
        cache = self.fetcher.cache
        return cache.hit_rate() if cache is not None else 0.0

    def stats(self) -> dict[str, float]:
        cache, fs = self.fetcher.cache, self.fetcher.stats
        return {
            "batches": fs.batches,
            "lookups": fs.lookups,
            "rows_fetched": fs.rows_fetched,
            "bytes_fetched": fs.bytes_fetched,
            "hits": cache.hits if cache else 0,
            "misses": cache.misses if cache else 0,
            "stale": cache.stale if cache else 0,
            "cached_rows": len(cache) if cache else 0,
            "hit_rate": self.hit_rate,
            "pushes": self.pushes.pushes,
            "rows_pushed": self.pushes.rows_pushed,
            "bytes_pushed": self.pushes.rows_pushed * (4 * self.embedding_dim + 8),  # float32 row + int64 ID
        }

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.embedding_dim}, mode={self.mode!r}"


class PrefetchingLoader(Generic[T]):
    """Wraps a data loader: while batch i is handed out, batch i+1's IDs are
    already being fetched (`module.prefetch(ids_of(batch))`)."""

    def __init__(
        self,
        loader: Iterable[T],
        modules: StoreEmbeddingBag | list[StoreEmbeddingBag],
        ids_of: Callable[[T], torch.Tensor | list[torch.Tensor]],
    ) -> None:
        self.loader = loader
        self.modules = modules if isinstance(modules, list) else [modules]
        self.ids_of = ids_of

    def __iter__(self) -> Iterator[T]:
        it = iter(self.loader)
        try:
            current = next(it)
        except StopIteration:
            return
        self._prefetch(current)
        for nxt in it:
            self._prefetch(nxt)  # runs while `current` trains
            yield current
            current = nxt
        yield current

    def _prefetch(self, batch: T) -> None:
        ids = self.ids_of(batch)
        ids_list = ids if isinstance(ids, list) else [ids]
        for module, one in zip(self.modules, ids_list, strict=True):
            module.prefetch(one)
