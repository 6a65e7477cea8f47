"""A payload's life on this replica: inline in its command or staged (written
here and sent to a majority of the shard's replicas) before the command is
proposed; fetched from a peer if still missing when the command applies;
collected once a snapshot covers it. Bytes stay out of the Raft log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from . import commands, content_id
from .commands import Command, Inline, Stored
from .config import Config
from .datapath import DataPathClient, PayloadStream
from .errors import StoreError, Unavailable
from .futures import forward
from .payloads import PayloadStore
from .routing import Routing
from .shardhost import ShardHost
from .threadnames import name_this_thread

log = logging.getLogger(__name__)


class PayloadStaging:
    def __init__(self, cfg: Config, routing: Routing, peer_client: DataPathClient, closed: threading.Event) -> None:
        self.cfg = cfg
        self.routing = routing
        self.peer_client = peer_client
        self._closed = closed
        self._stage_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="stage", initializer=name_this_thread)
        self._payload_writer = ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="payload-write", initializer=name_this_thread
        )

    def close(self) -> None:
        self._stage_pool.shutdown(wait=False, cancel_futures=True)
        self._payload_writer.shutdown(wait=False, cancel_futures=True)

    # ---- before proposing (request threads) -------------------------------------
    def submit(self, host: ShardHost, cmd: Command) -> Future[Any]:
        """Propose `cmd` with each payload in it replaced by a reference: the
        bytes inline if small, else an id once a majority of the shard's
        replicas hold them."""
        inline_limit = self.cfg.limits.inline_payload_bytes
        refs: dict[commands.BlobPath, commands.Ref] = {}
        large: list[tuple[commands.BlobPath, Any]] = []
        for path, blob in commands.blobs(cmd):
            if len(blob) <= inline_limit:
                refs[path] = Inline(bytes(blob))
            else:
                large.append((path, blob))
        if not large:
            return host.raft().propose(commands.with_refs(cmd, refs))
        outer: Future[Any] = Future()

        def stage() -> None:
            try:
                for path, blob in large:
                    # the local copy is written while the peers receive theirs
                    payload_id = getattr(blob, "content_id", None) or content_id.id_of(blob)
                    local = self._payload_writer.submit(host.payloads.put, blob, payload_id, payload_id)
                    stream = getattr(blob, "stream", None)  # already on its way to the peers
                    if stream is not None:
                        stream.finish(payload_id)
                        stream.wait(host.majority - 1, self.cfg.limits.request_timeout)
                    else:
                        self.peer_client.replicate(
                            [p.data for p in host.peers],
                            host.shard,
                            payload_id,
                            blob,
                            need=host.majority - 1,
                            timeout=self.cfg.limits.request_timeout,
                        )
                    local.result()
                    refs[path] = Stored(payload_id, len(blob))
                forward(host.raft().propose(commands.with_refs(cmd, refs)), outer)
            except StoreError as e:
                outer.set_exception(e)
            except Exception as e:
                log.exception("staging a payload failed")
                outer.set_exception(Unavailable(f"could not stage the payload: {e}"))
            finally:
                _end_streams(large)

        try:
            self._stage_pool.submit(stage)
        except RuntimeError as e:  # shutting down
            _end_streams(large)
            raise Unavailable(f"this replica is shutting down: {e}") from None
        return outer

    def stream(self, name: str, size: int) -> PayloadStream | None:
        """Start forwarding a large payload for `name` to the other replicas of
        its shard while it arrives; None if the shard has no other replicas."""
        host = self.routing.host_of(name)
        peers = host.peers
        if not peers:
            return None
        return self.peer_client.stream([p.data for p in peers], host.shard, size)

    # ---- applying and after (applier and snapshot threads) ----------------------
    def resolver(self, shard: int, payloads: PayloadStore) -> Callable[[Stored, int], Any]:
        """The bytes a sideloaded command names, for the applier: from this
        replica's store, else from a peer (retried until found or closing)."""

        def resolve(ref: Stored, index: int) -> Any:
            payload_id = ref.id
            delay = 0.05
            while True:
                data = payloads.get(payload_id)
                if data is not None:
                    return data
                # A background push may be about to land; then ask the peers.
                if payloads.wait_for(payload_id, 0.2):
                    continue
                for peer in self.routing.shards[shard].peers:
                    try:
                        fetched = self.peer_client.fetch(peer.data, shard, payload_id)
                    except (OSError, ConnectionError, ValueError) as e:
                        log.info("fetching payload %s from %s failed: %s", payload_id[:12], peer.id, e)
                        continue
                    if fetched is not None:
                        payloads.put(fetched, payload_id, digest=payload_id)  # fetch verified it
                        return fetched
                if self._closed.is_set():
                    raise Unavailable("shutting down")
                log.warning(
                    "shard %d: payload %s for index %d not found on any peer; retrying", shard, payload_id[:12], index
                )
                self._closed.wait(delay)
                delay = min(delay * 2, 2.0)

        return resolve

    def payload_used(self, shard: int, payloads: PayloadStore) -> Callable[[str, int, int], None]:
        """Marks a payload applied and forces a compaction once the payload
        bytes applied since the last snapshot outgrow the state."""

        def used(payload_id: str, size: int, index: int) -> None:
            payloads.applied(payload_id, index)
            host = self.routing.shards[shard]
            host.payload_bytes_since_snapshot += size
            threshold = max(self.cfg.raft.compaction_min_bytes, host.state.nbytes)
            if host.payload_bytes_since_snapshot > threshold and host.replica is not None:
                host.payload_bytes_since_snapshot = 0
                host.replica.forceLogCompaction()

        return used

    @staticmethod
    def snapshot_done(host: ShardHost) -> Callable[[int, int, float], None]:
        def done(index: int, size: int, seconds: float) -> None:
            removed = host.payloads.collect(index)
            if removed:
                log.info("shard %d: collected %d payloads covered by the snapshot", host.shard, removed)

        return done


def _end_streams(large: list[tuple[commands.BlobPath, Any]]) -> None:
    """Abort the cut-through streams of payloads that were not finished (the
    peers drop what they received) and unlink the rest from their buffers."""
    for _, blob in large:
        stream = getattr(blob, "stream", None)
        if stream is not None:
            if not stream.finished:
                stream.abort()
            del blob.stream  # the stream's queues hold views of the buffer: no cycle
