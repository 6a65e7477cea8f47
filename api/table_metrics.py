"""Embedding tables in GET /metrics: what this replica holds of each table
(read at scrape time) and the lookups and pushes it served."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class TableCollector(Collector):
    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterable[Any]:
        service = getattr(self.store, "tables", None)
        if service is None:
            return
        node = self.store.node.id
        lbl = ["node", "table"]
        rows = GaugeMetricFamily("paramstore_table_rows", "Rows stored here (all shard parts)", labels=lbl)
        disk = GaugeMetricFamily("paramstore_table_disk_bytes", "Bytes of the table's files here", labels=lbl)
        memory = GaugeMetricFamily(
            "paramstore_table_memory_bytes",
            "Row caches, memtables, table readers and admission counters (not the shared block cache)",
            labels=lbl,
        )
        version = GaugeMetricFamily("paramstore_table_version", "Pushes applied, summed over shards", labels=lbl)
        admitted = CounterMetricFamily("paramstore_table_rows_admitted", "Rows created", labels=lbl)
        refused = CounterMetricFamily(
            "paramstore_table_rows_refused", "Gradient rows dropped by admission (min_count)", labels=lbl
        )
        evicted = CounterMetricFamily("paramstore_table_rows_evicted", "Rows evicted (TTL, max_rows)", labels=lbl)
        lookups = CounterMetricFamily("paramstore_table_lookups", "Lookup requests served here", labels=lbl)
        lookup_rows = CounterMetricFamily("paramstore_table_lookup_rows", "Rows looked up here", labels=lbl)
        pushes = CounterMetricFamily("paramstore_table_pushes", "Push requests received here", labels=lbl)
        push_rows = CounterMetricFamily("paramstore_table_push_rows", "Gradient rows received here", labels=lbl)
        cache_reads = CounterMetricFamily(
            "paramstore_table_block_cache_reads",
            "Reads of the table's blocks in RocksDB's block cache (hit rate: hit / (hit + miss))",
            labels=[*lbl, "result"],
        )
        row_reads = CounterMetricFamily(
            "paramstore_table_row_cache_reads",
            "Record reads in the table's row caches, in front of RocksDB (hit rate: hit / (hit + miss))",
            labels=[*lbl, "result"],
        )
        for info in service.list():
            key = [node, info["name"]]
            rows.add_metric(key, info["rows"])
            disk.add_metric(key, info["bytes_on_disk"])
            memory.add_metric(key, info["bytes_in_memory"])
            version.add_metric(key, info["version"])
            admitted.add_metric(key, info["admitted"])
            refused.add_metric(key, info["refused"])
            evicted.add_metric(key, info["evicted"])
            served = service.served.get(info["name"], [0, 0, 0, 0])
            for family, value in zip((lookups, lookup_rows, pushes, push_rows), served, strict=True):
                family.add_metric(key, value)
            hits, misses = service.cache_hits(info["name"])
            cache_reads.add_metric([*key, "hit"], hits)
            cache_reads.add_metric([*key, "miss"], misses)
            hits, misses = service.row_cache_hits(info["name"])
            row_reads.add_metric([*key, "hit"], hits)
            row_reads.add_metric([*key, "miss"], misses)
        yield from (rows, disk, memory, version, admitted, refused, evicted, lookups, lookup_rows, pushes, push_rows)
        yield from (cache_reads, row_reads)
        budget = service.budget
        if budget is not None:
            cache = GaugeMetricFamily(
                "paramstore_table_cache_bytes",
                "The tables' memory cap (limits.table_cache_bytes) and its usage: block cache plus row caches",
                labels=["node", "kind"],
            )
            cache.add_metric([node, "capacity"], budget.cache_bytes)
            cache.add_metric([node, "usage"], budget.usage())
            yield cache
