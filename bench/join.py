"""A fourth replica joins a loaded 3-replica cluster under write load.

    python -m bench.join              # 512 MB of parameters, 3 reps (make bench-join)
    python -m bench.join --mb 128 --reps 1

Measures, per join: the snapshot download over the data path, the time from
starting `paramstore serve --join` to the new replica being ready (caught
up), and the leader elections during it; side by side with the loopback TCP
limit for the same bytes, measured in the same run. Writes
bench/results/join.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .load import loopback_mb_s
from .systems import ROOT, Paramstore, _kill

MB = 1 << 20


def log(msg: str) -> None:
    print(f"[join] {msg}", flush=True)


class JoiningParamstore(Paramstore):
    """3 bootstrap replicas plus spare nodes n4.. that join with --join."""

    def __init__(self, workdir: Path, spares: int = 1, shards: int = 4, ports: int | None = None) -> None:
        if ports is not None:  # another cluster (another bench) may hold the default ports
            self.HTTP, self.RAFT = ports, ports + 100
        super().__init__(workdir, replicas=3, shards=shards)
        from api.devcluster import dev_config
        from store.config import config_from_mapping, render_toml

        full = config_from_mapping(dev_config(3 + spares, self.HTTP, self.RAFT, shards, 3, self.cfg.raft.password))
        self.join_config = self.dir / "cluster-join.toml"
        self.join_config.write_text(render_toml(full))
        self.urls.update({n.id: (n.http.host, n.http.port) for n in full.nodes})

    def start_joining(self, node: str, seed: str) -> float:
        host, port = self.urls[seed]
        started = self.start_node(
            node, config=self.join_config, extra=("--join", f"http://{host}:{port}"), log_level="info", fresh_log=True
        )
        self.nodes.append(node)
        return started

    def remove(self, node: str) -> None:
        c = self.conn(self.nodes[0])
        st, body = c.request("DELETE", f"/v1/cluster/members/{node}", {}, b"")
        c.close()
        if st != 200:
            raise RuntimeError(f"removing {node}: {st} {bytes(body)[:300]!r}")
        self.procs[node].send_signal(signal.SIGTERM)
        _kill(self.procs.pop(node))
        self.nodes.remove(node)
        shutil.rmtree(self.dir / node, ignore_errors=True)


PHASES = {
    "planned": "HTTP Request: GET",
    "downloaded": "snapshots downloaded",
    "replicas started": "hosting shards",
    "added": "join: added",
    "serving": "Uvicorn running",
}


def timeline(text: str, t0_wall: float) -> dict[str, float]:
    """Seconds from process start to each phase, from the replica's JSON log."""
    out = {}
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        for phase, marker in PHASES.items():
            if phase not in out and marker in doc.get("msg", ""):
                out[phase] = round(doc["ts"] - t0_wall, 2)
    return out


def write_load(ps: Paramstore, stop: threading.Event, counts: dict) -> None:
    """One client pushing 1 KB gradients through n1 the whole time."""
    conn = ps.conn("n1")
    grad = np.ones(256, np.float32)
    while not stop.is_set():
        st, _ = ps.push(conn, "hot", grad)
        counts[st] = counts.get(st, 0) + 1
    conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.join", description=__doc__)
    ap.add_argument("--mb", type=int, default=512, help="parameter bytes held by the cluster (MB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ports", type=int, help="first HTTP port (Raft ports from +100); default 11000")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "join.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="psbench-join-"))
    ps = JoiningParamstore(work, ports=args.ports)
    log(f"starting 3 replicas in {work}")
    ps.start()
    runs = []
    try:
        tensor = 64 * MB
        rng = np.random.default_rng(0)
        for i in range(max(1, args.mb * MB // tensor)):
            ps.put("n1", f"w{i}", rng.standard_normal(tensor // 4, dtype=np.float32), {"type": "assign"})
        ps.put("n1", "hot", np.zeros(256, np.float32), {"type": "sgd", "lr": 0.01})
        log(f"loaded {args.mb} MB")
        tcp = float(np.median(loopback_mb_s(args.mb * MB, 3)))
        log(f"loopback TCP: {tcp:.0f} MB/s")
        for k in range(args.reps):
            stop, counts = threading.Event(), {}
            loader = threading.Thread(target=write_load, args=(ps, stop, counts), daemon=True)
            loader.start()
            terms = ps.terms()
            t0_wall = time.time()
            t0 = ps.start_joining("n4", seed="n2")
            t1 = ps.wait_ready(["n4"], timeout=600)
            elections = ps.terms() - terms
            stop.set()
            loader.join(30)
            text = (ps.dir / "n4.log").read_text()
            snap_bytes = sum(int(b) for b in re.findall(r"snapshot from n\d, (\d+) bytes", text))
            snap_s = float(re.findall(r"snapshots downloaded in ([\d.]+)s", text)[-1])
            phases = timeline(text, t0_wall)
            run = {
                "ready_s": t1 - t0,
                "phases_s": phases,
                "snapshot_mb": snap_bytes / MB,
                "download_s": snap_s,
                "download_mb_s": snap_bytes / MB / snap_s if snap_s else None,
                "elections": elections,
                "writes_during": counts,
            }
            runs.append(run)
            log(
                f"join {k + 1}: {run['snapshot_mb']:.0f} MB of snapshots in {snap_s:.2f}s "
                f"({run['download_mb_s'] or 0:.0f} MB/s), ready {run['ready_s']:.2f}s after start, "
                f"{elections} election(s), writes meanwhile {counts}"
            )
            log(f"  timeline (s after start): {phases}")
            ps.remove("n4")
        ready = float(np.median([r["ready_s"] for r in runs]))
        rate = float(np.median([r["download_mb_s"] for r in runs if r["download_mb_s"]]))
        print()
        print(f"| join of a replica to {args.mb} MB, under load | paramstore | loopback TCP | ratio |")
        print("|---|---|---|---|")
        print(f"| snapshot download MB/s (median of {len(runs)}) | {rate:.0f} | {tcp:.0f} | {rate / tcp:.2f}x |")
        print(
            f"| start to ready, s (min-max) | {ready:.2f} ({min(r['ready_s'] for r in runs):.2f}-"
            f"{max(r['ready_s'] for r in runs):.2f}) | {args.mb / tcp:.2f} (bytes alone) | "
            f"{ready / (args.mb / tcp):.1f}x |"
        )
        print(f"| leader elections during joins | {sum(r['elections'] for r in runs)} | | |")
        Path(args.out).write_text(json.dumps({"mb": args.mb, "loopback_mb_s": tcp, "runs": runs}, indent=1))
        log(f"wrote {args.out}")
    except BaseException:
        ps.stop()
        show_logs(ps, work)
        raise
    ps.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def show_logs(ps: Paramstore, work: Path, lines: int = 60) -> None:
    """A failed run keeps its work dir and shows the end of every replica's log,
    the joiner's first (it is the one that usually failed)."""
    logs = sorted(ps.dir.glob("*.log"), key=lambda p: (p.stem != "n4", p.stem))
    for path in logs:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        print(f"\n[join] ---- last {len(tail)} lines of {path} ----", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    print(f"\n[join] FAILED; work dir kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
