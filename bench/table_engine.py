"""Candidate on-disk row engines for embedding tables, measured side by side.

    python bench/table_engine.py [--rows 1000000] [--dim 64] [--batch 4096] [--dir /tmp]

Each engine stores `rows` records keyed by 8-byte big-endian IDs; a record is
one float32 row of `dim` plus a rowwise_adagrad accumulator and the row's last
update version (dim*4 + 12 bytes), the layout store/tables uses. Measured per
engine: bulk load, random-batch put (read-modify-write, as a push does) and
get of `batch` distinct existing IDs (rows/s), a consistent snapshot while the
engine stays open (seconds, extra RSS), RSS after each phase. Every engine
runs in its own child process so RSS figures do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the store package of this checkout


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def keys_of(ids: np.ndarray) -> list[bytes]:
    raw = ids.astype(">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


class LmdbEngine:
    name = "lmdb"

    def __init__(self, path: Path, cache_mb: int) -> None:
        import lmdb
        self.lmdb = lmdb
        self.env = lmdb.open(str(path), map_size=1 << 40, sync=False, metasync=False,
                             readahead=False, max_dbs=4, lock=True)
        self.db = self.env.open_db(b"rows")

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            txn.cursor().putmulti(zip(keys, values))

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        with self.env.begin(db=self.db, buffers=False) as txn:
            found = dict(txn.cursor().getmulti(keys))
        return [found.get(k) for k in keys]

    def snapshot(self, dest: Path) -> None:
        dest.mkdir()
        txn = self.env.begin()
        try:
            self.env.copy(str(dest), compact=True, txn=txn)
        except TypeError:  # build without the patched copy-from-txn
            txn.abort()
            self.env.copy(str(dest), compact=True)
            return
        txn.abort()

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in Path(self.env.path()).iterdir())

    def close(self) -> None:
        self.env.close()


class CappedLmdbEngine:
    """LMDB through store.tables.engine.RowStore: mapped pages capped at cache_mb."""
    name = "lmdb-capped"

    def __init__(self, path: Path, cache_mb: int) -> None:
        from store.tables.engine import MapBudget, RowStore
        self.store = RowStore(path, RECORD_BYTES, budget=MapBudget(cache_mb << 20))

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        ids = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
        with self.store.write() as txn:
            self.store.put_records(txn, ids, np.frombuffer(b"".join(values), dtype=np.uint8)
                                   .reshape(len(ids), -1))

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        ids = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
        with self.store.read() as txn:
            _, recs = self.store.get_records(txn, ids)
        return [r.tobytes() for r in recs]

    def snapshot(self, dest: Path) -> None:
        dest.mkdir()
        with open(dest / "data.mdb", "wb") as f:
            self.store.write_snapshot(self.store.begin_snapshot(), f)

    def disk_bytes(self) -> int:
        return self.store.disk_bytes()

    def close(self) -> None:
        self.store.close()


class RocksEngine:
    name = "rocksdb"

    wal = False

    def __init__(self, path: Path, cache_mb: int) -> None:
        import rocksdict as r
        self.r = r
        opts = r.Options(raw_mode=True)
        opts.create_if_missing(True)
        table = r.BlockBasedOptions()
        table.set_block_cache(r.Cache(cache_mb << 20))
        table.set_bloom_filter(10, False)
        opts.set_block_based_table_factory(table)
        opts.set_compression_type(r.DBCompressionType.none())
        table.set_cache_index_and_filter_blocks(True)
        opts.set_write_buffer_size(32 << 20)
        opts.increase_parallelism(2)
        self.path = path
        self.db = r.Rdict(str(path), opts)
        self.wopt = r.WriteOptions()
        self.wopt.disable_wal = not self.wal

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        wb = self.r.WriteBatch(raw_mode=True)
        for k, v in zip(keys, values):
            wb.put(k, v)
        self.db.write(wb, self.wopt)

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        return self.db.get(keys)

    def snapshot(self, dest: Path) -> None:
        self.r.Checkpoint(self.db).create_checkpoint(str(dest))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def close(self) -> None:
        self.db.close()


class RocksWalEngine(RocksEngine):
    """RocksDB with its write-ahead log on (not fsynced): a process crash loses nothing."""
    name = "rocksdb-wal"
    wal = True


ENGINES: dict[str, Callable[[Path, int], Any]] = {"lmdb": LmdbEngine, "lmdb-capped": CappedLmdbEngine,
                                                   "rocksdb": RocksEngine, "rocksdb-wal": RocksWalEngine}
RECORD_BYTES = 0  # set per run (CappedLmdbEngine needs it up front)


def run_one(engine_name: str, rows: int, dim: int, batch: int, base: Path, cache_mb: int,
            repeats: int) -> dict[str, Any]:
    global RECORD_BYTES
    rng = np.random.default_rng(1)
    rec = RECORD_BYTES = dim * 4 + 12
    all_ids = np.unique(rng.integers(0, 2**63 - 1, size=rows + rows // 10, dtype=np.int64))[:rows]
    rng.shuffle(all_ids)
    path = base / engine_name
    path.mkdir()
    eng = ENGINES[engine_name](path, cache_mb)
    out: dict[str, Any] = {"engine": engine_name, "rows": rows, "dim": dim, "batch": batch,
                           "record_bytes": rec}
    blob = rng.integers(0, 255, size=rec * 65536, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    chunk = 65536
    for s in range(0, rows, chunk):
        ids = np.sort(all_ids[s:s + chunk])
        eng.put(keys_of(ids), [blob[i * rec:(i + 1) * rec] for i in range(len(ids))])
    out["load_rows_per_s"] = rows / (time.perf_counter() - t0)
    out["rss_after_load_mb"] = rss_mb()

    def timed(fn: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    get_times, put_times = [], []
    for r in range(repeats):
        ids = np.sort(rng.choice(all_ids, size=batch, replace=False))
        keys = keys_of(ids)
        t = time.perf_counter()
        got = eng.get(keys)
        arr = np.frombuffer(b"".join(got), dtype=np.uint8).reshape(batch, rec)  # as a lookup would
        get_times.append(time.perf_counter() - t)
        assert arr.shape == (batch, rec)
        t = time.perf_counter()
        got = eng.get(keys)  # a push reads, updates and writes back the same rows
        upd = np.frombuffer(b"".join(got), dtype=np.uint8).reshape(batch, rec).copy()
        upd[:, :4] ^= 1
        raw = upd.tobytes()
        eng.put(keys, [raw[i * rec:(i + 1) * rec] for i in range(batch)])
        put_times.append(time.perf_counter() - t)
    out["get_rows_per_s"] = batch / float(np.median(get_times))
    out["push_rmw_rows_per_s"] = batch / float(np.median(put_times))
    out["rss_after_ops_mb"] = rss_mb()
    out["disk_mb"] = eng.disk_bytes() / 2**20
    before = rss_mb()
    t = time.perf_counter()
    eng.snapshot(base / f"{engine_name}-snap")
    out["snapshot_s"] = time.perf_counter() - t
    out["snapshot_extra_rss_mb"] = rss_mb() - before
    out["peak_rss_mb"] = peak_rss_mb()
    eng.close()
    t = time.perf_counter()
    eng = ENGINES[engine_name](path, cache_mb)
    eng.get(keys_of(all_ids[:1]))
    out["reopen_s"] = time.perf_counter() - t
    eng.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache-mb", type=int, default=64,
                    help="RocksDB block cache; lmdb-capped's cap on mapped pages")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--engine", choices=sorted(ENGINES), help="run one engine here (internal)")
    args = ap.parse_args()
    if args.engine:
        base = Path(tempfile.mkdtemp(dir=args.dir, prefix="table-engine-"))
        try:
            print(json.dumps(run_one(args.engine, args.rows, args.dim, args.batch, base,
                                     args.cache_mb, args.repeats)))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    results = []
    for name in ENGINES:
        cmd = [sys.executable, __file__, "--engine", name] + [
            f"--{k}={v}" for k, v in [("rows", args.rows), ("dim", args.dim), ("batch", args.batch),
                                      ("repeats", args.repeats), ("cache-mb", args.cache_mb),
                                      ("dir", args.dir)]]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = [k for k in results[0] if k not in ("engine",)]
    print(f"{'':24}" + "".join(f"{r['engine']:>14}" for r in results))
    for k in keys:
        print(f"{k:24}" + "".join(
            f"{r[k]:>14,.2f}" if isinstance(r[k], float) else f"{r[k]:>14,}" for r in results))


if __name__ == "__main__":
    main()
