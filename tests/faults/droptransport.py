"""Replica side of the fault suite's fallback where network namespaces are not
allowed: a pysyncobj transport that drops Raft messages on links a test cut.

Replicas load it with `raft.transport = "tests.faults.droptransport:DropTransport"`
and read the cut links from the file named by $PARAMSTORE_FAULTS_FILE: one
"SRC DST" pair of hosts per line, meaning no message from SRC reaches DST (as
an nftables drop rule would). Tests rewrite the file (atomically) to cut and
heal; replicas look at it at most every 20 ms. Only Raft is cut, not HTTP or
the payload data path.
"""

from __future__ import annotations

import os
import time
from typing import Any

from store.pysyncobj_adapter import LinkFilterTransport

ENV = "PARAMSTORE_FAULTS_FILE"
RECHECK = 0.02


def read_links(path: str) -> frozenset[tuple[str, str]]:
    try:
        with open(path) as f:
            return frozenset(tuple(line.split()) for line in f if len(line.split()) == 2)
    except FileNotFoundError:
        return frozenset()


class DropTransport(LinkFilterTransport):
    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self._links_file = os.environ.get(ENV)
        self._cut: frozenset[tuple[str, str]] = frozenset()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        super().__init__(syncObj, selfNode, otherNodes)

    def link_cut(self, src_host: str | None, dst_host: str | None) -> bool:
        now = time.monotonic()
        if self._links_file and now - self._checked >= RECHECK:
            self._checked = now
            try:
                st = os.stat(self._links_file)
                stamp = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                self._stamp, self._cut = stamp, read_links(self._links_file) if stamp else frozenset()
        return (src_host, dst_host) in self._cut
