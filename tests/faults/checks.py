"""What every fault scenario ends with: load for a while, then converge and check the history."""

from __future__ import annotations

import time

from tests.cluster.harness import Cluster
from tests.faults.history import History, check
from tests.faults.workload import Workload
from tests.waiting import wait_until


def converge_and_check(c: Cluster, load: Workload, history: History) -> None:
    """The history is linearizable, every replica catches up to the last acknowledged write and holds
    the same bytes, and the load got enough writes and reads through to mean something."""
    violations = check(history.ops)
    assert violations == [], "\n".join(violations[:20])
    acked = max(o.version for o in history.ops if o.kind == "write" and o.status == "ok")
    c.wait_ready(timeout=40)
    finals = {}
    for nid in c.ids:
        wait_until(lambda nid=nid: c.get(nid, load.tensor)[1] >= acked, 30, f"{nid} caught up to v{acked}")
        finals[nid] = c.digest(nid, load.tensor, consistency="linearizable")
    assert len(set(finals.values())) == 1, finals
    counts = history.counts()
    print(f"checked {len(history.ops)} operations: {counts}; final version {acked}+")
    assert counts.get("write:ok", 0) >= 10 and counts.get("read:ok", 0) >= 10


def run_for(seconds: float) -> None:
    """Let the load run for `seconds`."""
    end = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() > end, seconds + 5, f"{seconds}s of load")
