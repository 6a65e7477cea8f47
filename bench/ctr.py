"""Training throughput of examples/train_ctr.py on a fresh 3-replica cluster.

    python -m bench --only ctr --systems paramstore     # within the bench report
    python -m bench.ctr [--steps N]                     # alone; prints the table

Samples/s (from the first step to the last, 4 workers; process start-up not
counted) with the worker cache and prefetch, without them, and one process
training the same model with a local torch.nn.EmbeddingBag (this machine's
limit); rows fetched and bytes moved per step, cache hit rate, held-out AUC.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .systems import ROOT, Paramstore

VARIANTS = {
    "cache + prefetch": {},
    "no cache, no prefetch": {"cache_rows": 0, "prefetch": False},
}


def example() -> ModuleType:
    # on sys.path, which worker processes inherit: they import the example by name
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    return importlib.import_module("train_ctr")


def measure(work: Path, steps: int, log: Any = print, http_port: int = Paramstore.HTTP) -> dict[str, Any]:
    ex = example()
    out: dict[str, Any] = {"steps_per_worker": steps, "load_avg_at_start": os.getloadavg()}

    class Cluster(Paramstore):
        HTTP, RAFT = http_port, http_port + 100

    for port in range(http_port, http_port + 3):  # else /readyz may be answered by another cluster
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise RuntimeError(f"port {port} is taken (another benchmark?): choose --http-port")
    system = Cluster(work, replicas=3, shards=2)
    system.start()
    try:
        urls = [f"http://{h}:{p}" for h, p in system.urls.values()]
        for label, fields in VARIANTS.items():
            s = ex.Setup(steps=steps, **fields)
            r = ex.train_on_store(s, urls, show=False)
            st = list(r["stats"].values())
            n_steps = s.workers * s.steps
            hits, misses = sum(x["hits"] for x in st), sum(x["misses"] for x in st)
            out[label] = {
                "samples_s": r["samples_per_s"],
                "auc": r["auc"],
                "rows_fetched_per_step": sum(x["rows_fetched"] for x in st) / n_steps,
                "hit_rate": hits / max(1, hits + misses),
                "bytes_per_step": sum(x["bytes_fetched"] + x["bytes_pushed"] for x in st) / n_steps,
            }
            log(f"  ctr {label}: {out[label]['samples_s']:.0f} samples/s, AUC {r['auc']:.4f}")
    finally:
        system.stop()
    s = ex.Setup(steps=steps)
    r = ex.train_locally(s)
    out["one process, torch.nn.EmbeddingBag"] = {"samples_s": r["samples_per_s"], "auc": r["auc"]}
    log(f"  ctr local: {r['samples_per_s']:.0f} samples/s, AUC {r['auc']:.4f}")
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    local = res["one process, torch.nn.EmbeddingBag"]["samples_s"]
    lines = [
        "",
        f"### CTR training throughput (examples/train_ctr.py, 4 workers x {res['steps_per_worker']} steps of 512)",
        "",
        "| | samples/s | vs local | rows fetched / step | hit rate | bytes / step | held-out AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in res.items():
        if not isinstance(r, dict):
            continue
        cells = [
            f"{r['samples_s']:,.0f}",
            f"{r['samples_s'] / local:.2f}x",
            f"{r['rows_fetched_per_step']:,.0f}" if "rows_fetched_per_step" in r else "-",
            f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-",
            f"{r['bytes_per_step'] / 1024:,.0f} KB" if "bytes_per_step" in r else "-",
            f"{r['auc']:.4f}",
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ctr", description=__doc__)
    ap.add_argument("--steps", type=int, default=150, help="steps per worker")
    ap.add_argument("--http-port", type=int, default=Paramstore.HTTP, help="first replica's port (Raft: +100)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    res = measure(Path(tempfile.mkdtemp(prefix="paramstore-bench-ctr-")), args.steps, http_port=args.http_port)
    print("\n".join(markdown(res)))
    print(f"\n({time.monotonic() - t0:.0f} s; load average at start {res['load_avg_at_start']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
