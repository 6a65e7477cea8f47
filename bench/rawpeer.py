"""Raw pysyncobj peer: the floor under paramstore.

One process per member: a SyncObj with one @replicated method doing the same
update a 1 KB gradient push does in paramstore (w -= lr * g on a float32
array), with paramstore's pysyncobj settings (store/config.py RaftSettings
defaults, the same eager append entries as store/raft.py through
store/pysyncobj_adapter.py, a journal file). No HTTP, no applier thread, no payload store.

Load is generated *inside the leader process*: `load` keeps C calls
outstanding, each completion callback (on pysyncobj's tick thread) records the
latency and issues that client's next call. That is the cheapest way a client
can reach pysyncobj at all, so it is a floor, not a peer with a network client.

Control: one JSON line per request on a loopback TCP port.

    python -m bench.rawpeer --self 127.0.0.1:P --peers A,B --ctl PORT --dir DIR
"""

from __future__ import annotations

import argparse
import json
import socketserver
import threading
import time

import numpy as np

from store.config import RaftSettings
from store.pysyncobj_adapter import FAIL_REASON, SyncObjConf, TunedSyncObj, replicated


class Raw(TunedSyncObj):
    guard_next_index = False  # --pipeline-fix turns on paramstore's nextIndex guard

    def __init__(self, me: str, peers: list[str], journal: str):
        s = RaftSettings()
        conf = SyncObjConf(
            autoTickPeriod=s.auto_tick_period,
            appendEntriesPeriod=s.append_entries_period,
            raftMinTimeout=s.min_timeout,
            raftMaxTimeout=s.max_timeout,
            connectionTimeout=s.connection_timeout,
            connectionRetryTime=min(1.0, s.connection_timeout),
            leaderFallbackTimeout=s.leader_fallback_timeout,
            appendEntriesBatchSizeBytes=2**16,
            sendBufferSize=s.socket_buffer_bytes,
            recvBufferSize=s.socket_buffer_bytes,
            logCompactionMinEntries=s.compaction_min_entries,
            logCompactionMinTime=s.compaction_min_seconds,
            commandsWaitLeader=True,
            bindAddress=me,
            journalFile=journal,
            dynamicMembershipChange=False,
        )
        self.w: dict[int, np.ndarray] = {}
        super().__init__(me, peers, conf)

    @replicated
    def push(self, g: bytes) -> int:
        a = np.frombuffer(g, np.float32)
        w = self.w.get(a.size)
        if w is None:
            w = np.zeros(a.size, np.float32)
        self.w[a.size] = w - np.float32(0.001) * a
        return len(g)


def run_load(obj: Raw, clients: int, seconds: float, nbytes: int) -> dict:
    g = np.ones(nbytes // 4, np.float32).tobytes()
    lat: list[float] = []
    errors = [0]
    start = time.perf_counter()
    end = start + seconds
    done = threading.Event()
    live = [clients]
    lock = threading.Lock()

    def issue():
        t0 = time.perf_counter()

        def cb(res, err):
            t1 = time.perf_counter()
            if err == FAIL_REASON.SUCCESS:
                if t1 <= end:
                    lat.append(t1 - t0)
            else:
                errors[0] += 1
            if t1 < end:
                issue()
            else:
                with lock:
                    live[0] -= 1
                    if live[0] == 0:
                        done.set()

        obj.push(g, callback=cb)

    for _ in range(clients):
        issue()
    done.wait(seconds + 30)
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 if lat else float("nan")

    return {"ops_s": len(lat) / seconds, "p50_ms": pct(50), "p99_ms": pct(99), "ops": len(lat), "errors": errors[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--self", required=True)
    ap.add_argument("--peers", required=True)
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--pipeline-fix", action="store_true")
    a = ap.parse_args()
    Raw.guard_next_index = a.pipeline_fix
    obj = Raw(a.self, a.peers.split(","), a.dir + "/journal.bin")

    class H(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                req = json.loads(line)
                op = req["op"]
                if op == "status":
                    st = obj.getStatus()
                    leader = st.get("leader")
                    out = {
                        "term": st["raft_term"],
                        "leader": str(leader) if leader else None,
                        "is_leader": st["state"] == 2,
                        "ready": obj.isReady(),
                    }
                elif op == "load":
                    out = run_load(obj, req["clients"], req["seconds"], req.get("nbytes", 1024))
                elif op == "write":
                    g = np.ones(req["nbytes"] // 4, np.float32).tobytes()
                    t0 = time.perf_counter()
                    try:
                        obj.push(g, sync=True, timeout=req["timeout"])
                        out = {"ok": True, "seconds": time.perf_counter() - t0}
                    except Exception as e:  # SyncObjException: 'timeout' / leader gone
                        out = {"ok": False, "error": repr(e), "seconds": time.perf_counter() - t0}
                else:
                    out = {"error": "unknown op"}
                self.wfile.write((json.dumps(out) + "\n").encode())
                self.wfile.flush()

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", a.ctl), H)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
