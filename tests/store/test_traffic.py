"""Byte counts per peer (store/traffic.py, CountingSocket, the data path), the
commit-latency window and the tables' block cache counters, on real sockets
and a real RocksDB."""

from __future__ import annotations

import hashlib
import os
import socket

import numpy as np

from store import traffic
from store.config import Address
from store.datapath import DataPathClient, DataPathServer
from store.payloads import PayloadStore
from store.pysyncobj_adapter import CountingSocket
from store.tables.engine import Batch, MemoryBudget, RowStore, row_keys
from store.traffic import LatencyWindow, quantile
from tests.ports import free_range
from tests.waiting import wait_until


def test_counting_sockets_count_what_each_side_sent_and_received():
    server = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert isinstance(accepted, CountingSocket)  # the stdlib's accept would make a plain socket
        sent = client.send(b"x" * 1000)
        got = b""
        while len(got) < sent:
            got += accepted.recv(4096)
        assert client.counts == [0, sent] and accepted.counts == [sent, 0]
        peer = [5, 7]  # counts the transport already holds for this peer
        accepted.attach(peer)  # the bytes before the peer was known move to it
        assert peer == [5 + sent, 7] and accepted.counts is peer
        accepted.send(b"y" * 10)
        assert peer == [5 + sent, 17]
        accepted.attach(peer)  # attaching again counts nothing twice
        assert peer == [5 + sent, 17]
    finally:
        for s in (client, accepted, server):
            s.close()


def test_data_path_counts_payload_bytes_per_peer_on_both_ends(tmp_path):
    port = free_range(1)
    server = DataPathServer(Address("127.0.0.1", port), {0: PayloadStore(tmp_path / "p")}, b"k", max_size=1 << 24)
    server.start()
    try:
        client = DataPathClient(b"k", timeout=10, origin="n1")
        data = os.urandom(300_000)
        pid = hashlib.sha256(data).hexdigest()
        client.replicate([Address("127.0.0.1", port)], 0, pid, data, need=1, timeout=10)
        assert bytes(client.fetch(Address("127.0.0.1", port), 0, pid)) == data
        assert client.traffic.snapshot() == {f"127.0.0.1:{port}": (len(data), len(data))}
        # labelled by the header's `from`; the server counts what it sent once sendall returned,
        # which may be after the client has it all
        wait_until(lambda: server.traffic.snapshot() == {"n1": (len(data), len(data))}, 10, "the server's counts")
    finally:
        server.close()


def test_quantiles_are_nearest_rank_over_the_recent_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(traffic.time, "monotonic", lambda: now[0])
    window = LatencyWindow(size=8)
    for i in range(10):  # the two oldest fall out of the ring
        window.add(float(i))
        now[0] += 1.0
    assert window.count == 10
    assert window.recent(100) == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert window.recent(3.5) == [7.0, 8.0, 9.0]  # taken at 1007, 1008, 1009; now 1010
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.99) == 99.0 and quantile(values, 1.0) == 100.0
    assert quantile([], 0.5) == 0.0 and quantile([3.0], 0.99) == 3.0


def test_a_tables_block_cache_reads_are_counted(tmp_path):
    store = RowStore(tmp_path / "t", record_size=16, budget=MemoryBudget(8 << 20, row_share=0.0))
    try:
        keys = np.arange(2000, dtype=np.uint64)
        batch = Batch()
        for key in row_keys(keys):
            batch.put(key, b"r" * 16)
        store.write(batch)
        assert store.cache_hits() == (0, 0)
        store.db.flush()  # rows in files: reads go through the block cache (memtable reads do not)
        store.get_records(keys[:500])
        first = store.cache_hits()
        store.get_records(keys[:500])  # the same blocks again: hits
        second = store.cache_hits()
        assert sum(first) > 0 and second[0] > first[0] and second[1] == first[1], (first, second)
        assert store.row_cache_hits() == (0, 1000)  # no row cache in this budget: every read misses it
    finally:
        store.close()


def test_a_tables_row_cache_reads_are_counted_and_spare_the_block_cache(tmp_path):
    store = RowStore(tmp_path / "t", record_size=16, budget=MemoryBudget(8 << 20))
    try:
        keys = np.arange(2000, dtype=np.uint64)
        batch = Batch()
        for key in row_keys(keys):
            batch.put(key, b"r" * 16)
        store.write(batch)
        store.db.flush()
        store.get_records(keys[:500])
        blocks = store.cache_hits()
        assert sum(blocks) > 0 and store.row_cache_hits() == (0, 500)
        store.get_records(keys[:500])  # the same rows again: from the row cache (a few may have been crowded out)
        hits, misses = store.row_cache_hits()
        assert hits + misses == 1000 and hits >= 450, (hits, misses)
        again = store.cache_hits()
        assert sum(again) - sum(blocks) < sum(blocks), (blocks, again)  # block reads only for the rows not cached
    finally:
        store.close()
