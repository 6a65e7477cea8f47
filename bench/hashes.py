"""Hash throughput on this CPU: the candidates for the data path's digests.

    python -m bench.hashes [--sizes 1,16,64] [--seconds 0.5]
    python -m bench.hashes --transfer-mb 512 [--store-tree /other/checkout] [--rounds 3]

Single thread unless the row says otherwise; each figure is the best of
`--repeats` timed loops over one buffer of the size (MB/s, 1 MB = 2^20
bytes), fed in 4 MB slices as the data path feeds its hashers. Prints a
Markdown table for docs/benchmarks.md.

`--transfer-mb`: a signed `snapshot` (one file) and `tables` (8 files)
fetch of that many MB between a DataPathServer and a DataPathClient in this
process on loopback, the receiver's fsync included, in s/GB and CPU-s/GB
(both ends): the digest the joiner asks for alternates ("b3", then none:
SHA-256 as a joiner of an earlier version asks). `--store-tree` runs the
data path of another checkout (its `store` package) for an A/B.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import xxhash

MB = 1 << 20
SLICE = 4 << 20  # store/datapath.py CHUNK: what each update() sees on the data path
KEY = hashlib.sha256(b"bench").digest()


def _feed(make: Callable[[], object], buf: memoryview) -> None:
    h = make()
    for i in range(0, len(buf), SLICE):
        h.update(buf[i : i + SLICE])  # type: ignore[attr-defined]
    h.digest()  # type: ignore[attr-defined]


HASHES: dict[str, Callable[[], object]] = {
    "hashlib sha256": hashlib.sha256,
    "hmac-sha256 (keyed)": lambda: hmac.new(KEY, digestmod=hashlib.sha256),
    "blake3 keyed, 1 thread": lambda: blake3.blake3(key=KEY),
    "blake3 keyed, max_threads=AUTO": lambda: blake3.blake3(key=KEY, max_threads=blake3.blake3.AUTO),
    "xxh3_128 seeded": lambda: xxhash.xxh3_128(seed=0x5EED),
}


def rate(make: Callable[[], object], size: int, seconds: float, repeats: int) -> float:
    buf = memoryview(os.urandom(size))
    best = float("inf")
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            _feed(make, buf)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        best = min(best, elapsed / n)
    return size / best / (1 << 20)


def transfer(mb: int, rounds: int, store_tree: str | None) -> None:
    if store_tree:
        sys.path.insert(0, str(Path(store_tree).resolve()))
    import store
    from store.config import Address
    from store.datapath import DataPathClient, DataPathServer
    from store.payloads import PayloadStore

    print(f"data path of {Path(store.__file__).parent}; load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="bench-hashes-"))
    try:
        snap = work / "snapshot.bin"
        with open(snap, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(MB))
        files = work / "tables-src"
        (files / "t@1").mkdir(parents=True)
        for i in range(8):
            os.link(snap, files / "t@1" / f"{i:06d}.sst")  # the same bytes 8 times: 8 x mb in the stream
        made = iter(range(1_000_000))

        def tables(shard: int) -> Path:  # a fresh directory of hard links (the server removes it after sending)
            out = work / f"tables-{next(made)}"
            (out / "t@1").mkdir(parents=True)
            for f in (files / "t@1").iterdir():
                os.link(f, out / "t@1" / f.name)
            return out

        srv = DataPathServer(
            Address("127.0.0.1", 0),
            {0: PayloadStore(work / "p")},
            b"bench-secret",
            max_size=1 << 20,
            snapshot_source=lambda shard: snap,
            tables_source=tables,
        )
        srv.start()
        addr = Address("127.0.0.1", srv._server.server_address[1])
        client = DataPathClient(b"bench-secret", timeout=60)
        out: dict[str, list[tuple[float, float]]] = {}
        gb_snap, gb_tables = mb / 1024, 8 * mb / 1024
        for r in range(rounds):
            for asks in ["b3", None] if r % 2 == 0 else [None, "b3"]:
                client.stream_digest = asks  # type: ignore[attr-defined]  # an attribute older trees lack
                for what, gb in (("snapshot", gb_snap), ("tables", gb_tables)):
                    dest = work / "dest"
                    c0, t0 = time.process_time(), time.perf_counter()
                    if what == "snapshot":
                        dest.mkdir()
                        client.fetch_snapshot(addr, 0, dest / "snapshot.bin")
                    else:
                        client.fetch_tables(addr, 0, dest)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    shutil.rmtree(dest)
                    out.setdefault(f"{what}, asks {asks or 'nothing (sha256)'}", []).append((wall / gb, cpu / gb))
        srv.close()
        print("| fetch | s/GB | CPU-s/GB (both ends) |\n|---|---:|---:|")
        for k, v in out.items():
            walls, cpus = [w for w, _ in v], [c for _, c in v]
            print(
                f"| {k} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
                f"{statistics.median(cpus):.2f} ({min(cpus):.2f}-{max(cpus):.2f}) |"
            )
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16,64", help="buffer sizes in MB")
    p.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--transfer-mb", type=int, default=0, help="measure signed snapshot / tables fetches instead")
    p.add_argument("--store-tree", help="with --transfer-mb: the checkout whose store/ to run")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.transfer_mb:
        return transfer(a.transfer_mb, a.rounds, a.store_tree)
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    print("| hash | " + " | ".join(f"{s} MB" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    base: list[float] = []
    for name, make in HASHES.items():
        rates = [rate(make, s << 20, a.seconds, a.repeats) for s in sizes]
        base = base or rates
        cells = [f"{r:,.0f} MB/s ({r / b:.2f}x)" for r, b in zip(rates, base, strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
