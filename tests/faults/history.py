"""Operation histories and an O(n log n) linearizability check for versioned
registers.

Every committed write of a tensor gets a unique, increasing version, so a
history need not be searched for an order: writes are ordered by version, each
read is tied to the write of the version it saw, and real time is checked with
one sweep. Writes whose outcome is unknown (timeouts, dropped connections)
may or may not appear, but never twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Op:
    client: int
    kind: str  # "write" | "read"
    tensor: str
    invoke: float
    complete: float | None = None
    status: str = "pending"  # ok | fail (certainly not applied) | unknown (may have applied)
    version: int | None = None  # write: version it created; read: version observed
    value: int | None = None  # write: unique value written; read: value observed
    replica: str = ""
    linearizable: bool = True  # reads: does this read claim linearizability?


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, client: int, kind: str, tensor: str, **kw) -> Op:
        op = Op(client, kind, tensor, time.monotonic(), **kw)
        with self._lock:
            self.ops.append(op)
        return op

    @staticmethod
    def end(op: Op, status: str, version: int | None = None, value: int | None = None) -> None:
        op.complete = time.monotonic()
        op.status = status
        if version is not None:
            op.version = version
        if value is not None:
            op.value = value

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            key = f"{op.kind}:{op.status}"
            out[key] = out.get(key, 0) + 1
        return out


def check(ops: list[Op]) -> list[str]:
    """Violations of linearizability (empty list: the history is fine)."""
    problems: list[str] = []
    for tensor in sorted({op.tensor for op in ops}):
        problems += _check_tensor([op for op in ops if op.tensor == tensor], tensor)
    return problems


def _check_tensor(ops: list[Op], tensor: str) -> list[str]:
    bad: list[str] = []
    writes = [o for o in ops if o.kind == "write" and o.status in ("ok", "unknown")]
    reads = [o for o in ops if o.kind == "read" and o.status == "ok"]
    by_version: dict[int, Op] = {}
    for w in writes:
        if w.status != "ok":
            continue
        if w.version in by_version:
            bad.append(f"{tensor}: two acknowledged writes got version {w.version}")
        by_version[w.version] = w
    by_value = {w.value: w for w in writes}
    value_versions: dict[int, set[int]] = {}
    for o in writes + reads:
        if o.value is not None and o.version is not None:
            value_versions.setdefault(o.value, set()).add(o.version)
    for value, versions in value_versions.items():
        if len(versions) > 1:
            bad.append(f"{tensor}: value {value} appears at versions {sorted(versions)} (applied twice)")
    for r in reads:
        w = by_version.get(r.version) or by_value.get(r.value)
        if w is None:
            bad.append(
                f"{tensor}: read by client {r.client} saw version {r.version} value {r.value}, which no write produced"
            )
            continue
        if w.value != r.value:
            bad.append(f"{tensor}: read saw value {r.value} at version {r.version}, written as {w.value}")
        if w.invoke > r.complete:
            bad.append(f"{tensor}: read completed at {r.complete:.3f} saw a write invoked later")
    # Real time: a linearizable read sees at least every version acknowledged
    # (written or read) before it was invoked.
    events = sorted(
        [(o.complete, 1, i, o) for i, o in enumerate(writes + reads) if o.status == "ok" and o.complete]
        + [(r.invoke, 0, i, r) for i, r in enumerate(reads) if r.linearizable],
        key=lambda e: e[:2],
    )
    floor, floor_op = 0, None
    for _, kind, _, o in events:
        if kind == 1:
            if o.version is not None and o.version > floor:
                floor, floor_op = o.version, o
        elif o.version < floor:
            bad.append(
                f"{tensor}: stale read by client {o.client} on {o.replica or '?'}: saw version "
                f"{o.version} after version {floor} was acknowledged "
                f"({floor_op.kind} by client {floor_op.client})"
            )
    return bad
