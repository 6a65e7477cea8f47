"""Hash throughput on this CPU: the candidates for the data path's digests.

    python -m bench.hashes [--sizes 1,16,64] [--seconds 1.0]

Single thread unless the row says otherwise; each figure is the best of
`--repeats` timed loops over one buffer of the size (MB/s, 1 MB = 2^20
bytes), fed in 4 MB slices as the data path feeds its hashers. Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from collections.abc import Callable

import blake3
import xxhash

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16,64", help="buffer sizes in MB")
    p.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
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
