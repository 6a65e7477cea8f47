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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


class LmdbEngine:
    name = "lmdb"

    def __init__(self, path: Path, cache_mb: int) -> None:
        import lmdb

        self.lmdb = lmdb
        self.env = lmdb.open(
            str(path), map_size=1 << 40, sync=False, metasync=False, readahead=False, max_dbs=4, lock=True
        )
        self.db = self.env.open_db(b"rows")

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            txn.cursor().putmulti(zip(keys, values, strict=True))

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


def rss_file_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


class CappedLmdbEngine(LmdbEngine):
    """LMDB with its mapped pages capped: after every 1,024 rows, if the
    process's RssFile grew by more than the cap, madvise(MADV_DONTNEED) the map
    (the kernel maps 64 KB around each fault, so ~85 KB per random row)."""

    name = "lmdb-capped"

    def __init__(self, path: Path, cache_mb: int) -> None:
        import ctypes

        super().__init__(path, cache_mb)
        self.cap = cache_mb << 20
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        target = str((path / "data.mdb").resolve())
        with open("/proc/self/maps") as f:
            line = next(ln for ln in f if ln.rstrip().endswith(target))
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        self.region = (lo, hi - lo)
        self.baseline = rss_file_bytes()

    def _check(self) -> None:
        if rss_file_bytes() - self.baseline > self.cap:
            self.libc.madvise(self.region[0], min(self.region[1], self.disk_bytes() + 4096), 4)
            self.baseline = rss_file_bytes()

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        with self.env.begin(write=True, db=self.db) as txn:
            cur = txn.cursor()
            for s in range(0, len(keys), 1024):
                cur.putmulti(zip(keys[s : s + 1024], values[s : s + 1024], strict=True))
                self._check()

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        found: dict[bytes, bytes] = {}
        with self.env.begin(db=self.db, buffers=False) as txn:
            cur = txn.cursor()
            for s in range(0, len(keys), 1024):
                found.update(cur.getmulti(keys[s : s + 1024]))
                self._check()
        return [found.get(k) for k in keys]


class RocksEngine:
    """RocksDB as store/tables/engine.py runs it (WAL on, not fsynced; block
    cache of cache_mb holding index and filter blocks too)."""

    name = "rocksdb"

    def __init__(self, path: Path, cache_mb: int) -> None:
        from store.tables.engine import MemoryBudget, RowStore

        self.store = RowStore(path, RECORD_BYTES, budget=MemoryBudget(cache_mb << 20))
        self.wopt = self.store.wopt

    def settle(self) -> None:
        self.store.db.compact_range(None, None)

    def put(self, keys: list[bytes], values: list[bytes]) -> None:
        import rocksdict

        wb = rocksdict.WriteBatch(raw_mode=True)
        for k, v in zip(keys, values, strict=True):
            wb.put(b"r" + k, v)
        self.store.db.write(wb, self.wopt)

    def get(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.db.get([b"r" + k for k in keys])

    def snapshot(self, dest: Path) -> None:
        from store.tables.engine import send_dir

        self.store.checkpoint(dest)
        with open(str(dest) + ".stream", "wb") as f:  # what a joining replica would receive
            send_dir(dest, f)

    def disk_bytes(self) -> int:
        return self.store.disk_bytes()

    def close(self) -> None:
        self.store.close()


ENGINES: dict[str, Callable[[Path, int], Any]] = {
    "lmdb": LmdbEngine,
    "lmdb-capped": CappedLmdbEngine,
    "rocksdb": RocksEngine,
}
RECORD_BYTES = 0  # set per run (RocksEngine needs it up front)


def run_one(
    engine_name: str, rows: int, dim: int, batch: int, base: Path, cache_mb: int, repeats: int
) -> dict[str, Any]:
    global RECORD_BYTES
    rng = np.random.default_rng(1)
    rec = RECORD_BYTES = dim * 4 + 12
    all_ids = np.unique(rng.integers(0, 2**63 - 1, size=rows + rows // 10, dtype=np.int64))[:rows]
    rng.shuffle(all_ids)
    path = base / engine_name
    path.mkdir()
    eng = ENGINES[engine_name](path, cache_mb)
    out: dict[str, Any] = {"engine": engine_name, "rows": rows, "dim": dim, "batch": batch, "record_bytes": rec}
    blob = rng.integers(0, 255, size=rec * 65536, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    chunk = 65536
    for s in range(0, rows, chunk):
        ids = np.sort(all_ids[s : s + chunk])
        eng.put(keys_of(ids), [blob[i * rec : (i + 1) * rec] for i in range(len(ids))])
    out["load_rows_per_s"] = rows / (time.perf_counter() - t0)
    if hasattr(eng, "settle"):  # RocksDB: let the bulk load's compactions finish before reading
        eng.settle()
    out["rss_after_load_mb"] = rss_mb()

    def timed(fn: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    get_times, put_times = [], []
    for _ in range(repeats):
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
        eng.put(keys, [raw[i * rec : (i + 1) * rec] for i in range(batch)])
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
    ap.add_argument("--cache-mb", type=int, default=64, help="RocksDB block cache; lmdb-capped's cap on mapped pages")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--engine", choices=sorted(ENGINES), help="run one engine here (internal)")
    args = ap.parse_args()
    if args.engine:
        base = Path(tempfile.mkdtemp(dir=args.dir, prefix="table-engine-"))
        try:
            print(json.dumps(run_one(args.engine, args.rows, args.dim, args.batch, base, args.cache_mb, args.repeats)))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    results = []
    for name in ENGINES:
        cmd = [sys.executable, __file__, "--engine", name] + [
            f"--{k}={v}"
            for k, v in [
                ("rows", args.rows),
                ("dim", args.dim),
                ("batch", args.batch),
                ("repeats", args.repeats),
                ("cache-mb", args.cache_mb),
                ("dir", args.dir),
            ]
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = [k for k in results[0] if k not in ("engine",)]
    print(f"{'':24}" + "".join(f"{r['engine']:>14}" for r in results))
    for k in keys:
        print(f"{k:24}" + "".join(f"{r[k]:>14,.2f}" if isinstance(r[k], float) else f"{r[k]:>14,}" for r in results))


if __name__ == "__main__":
    main()
