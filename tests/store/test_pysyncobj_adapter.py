"""store/pysyncobj_adapter.py: the pinned pysyncobj has every internal we rely
on, nothing else reaches into pysyncobj, and the adapter works on a real node."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from store import pysyncobj_adapter as adapter
from tests.ports import free_range
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "store" / "pysyncobj_adapter.py"
SCANNED = ("store", "api", "bench", "tests", "examples", "paramstore")


def test_installed_pysyncobj_is_the_pinned_version():
    installed = adapter.installed_version()
    assert installed == adapter.PINNED_VERSION, (
        f"pysyncobj {installed} is installed but store/pysyncobj_adapter.py overrides and reads internals of "
        f"{adapter.PINNED_VERSION}: re-check every entry of RELIES_ON against the new source (and the "
        f"measurements in docs/architecture.md) before moving the pin"
    )


def test_every_internal_the_adapter_relies_on_exists():
    missing = adapter.missing_names()
    assert missing == [], f"pysyncobj internals store/pysyncobj_adapter.py relies on are gone: {missing}"


@pytest.mark.parametrize(
    "entry",
    [
        ("pysyncobj.syncobj:SyncObj", "_SyncObj__noSuchMethod", "attr"),
        ("pysyncobj.syncobj:SyncObj", "_SyncObj__noSuchField", "field"),
        ("pysyncobj.syncobj:SyncObj._SyncObj__onMessageReceived", "no_such_message_key", "const"),
        ("pysyncobj.syncobj:NoSuchClass", "LEADER", "attr"),
        ("pysyncobj.no_such_module", "socket", "attr"),
    ],
)
def test_the_check_reports_a_missing_name(monkeypatch, entry):
    monkeypatch.setattr(adapter, "RELIES_ON", [*adapter.RELIES_ON, entry])
    assert adapter.missing_names() == [f"{entry[0]} {entry[1]} ({entry[2]})"]


def _pysyncobj_private(name: str) -> bool:
    """`name` is one of pysyncobj's own private methods or fields."""
    from pysyncobj import SyncObj
    from pysyncobj.transport import TCPTransport

    return any(hasattr(cls, name) or name in cls.__init__.__code__.co_names for cls in (SyncObj, TCPTransport))


def test_every_private_name_the_adapter_uses_is_checked():
    source = ADAPTER.read_text()
    checked = {name for _, name, _ in adapter.RELIES_ON}
    used = set(re.findall(r"\b_SyncObj__\w+", source))
    used |= {m for m in re.findall(r"(?:self|SyncObj|super\(\))\.(_[A-Za-z]\w*)", source) if _pysyncobj_private(m)}
    assert {"_SyncObj__raftState", "_getLeader", "_poller", "_selfNode"} <= used, "the patterns miss uses"
    assert used - checked == set(), f"used but not in RELIES_ON: {sorted(used - checked)}"


def test_nothing_else_reaches_into_pysyncobj():
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in SCANNED or path in (ADAPTER, Path(__file__)):
            continue
        text = path.read_text()
        for pattern in (
            r"_SyncObj__",
            r"tcp_connection",
            r"pipe_notifier",
            r"\._onMessageReceived",
            r"\._selfNode",
            r"\._checkCommandsToApply",
            r"\._getLeader",
            r"\._getRaftLogSize",
            r"\._poller\b",
        ):
            if re.search(pattern, text):
                offenders.append(f"{rel}: {pattern}")
    assert offenders == [], f"pysyncobj internals outside store/pysyncobj_adapter.py: {offenders}"


def test_dump_meta_survives_json():
    from pysyncobj.node import TCPNode

    meta = ((b"\x00last", 7, 3), (b"\x01prev", 6, 3), {TCPNode("127.0.0.1:1"), TCPNode("127.0.0.2:1")})
    index, as_json = adapter.dump_meta_to_json(meta)
    assert index == 7
    last, prev, cluster = adapter.dump_meta_from_json(as_json)
    assert (last, prev) == meta[:2]
    assert {n.id for n in cluster} == {"127.0.0.1:1", "127.0.0.2:1"}


class OneNode(adapter.TunedSyncObj):
    def __init__(self, journal: Path, held: bool) -> None:
        self.held = held
        self.before_append = 0
        conf = adapter.SyncObjConf(
            journalFile=str(journal),
            appendEntriesPeriod=0.02,
            raftMinTimeout=0.1,
            raftMaxTimeout=0.2,
            connectionTimeout=0.5,
            autoTickPeriod=0.005,
        )
        super().__init__(f"127.0.0.1:{free_range(1)}", [], conf, thread_name="raft-test")

    def _before_append(self) -> None:
        self.before_append += 1

    def _may_campaign(self) -> bool:
        return not self.held

    @adapter.replicated
    def _apply(self, cmd: str) -> str:
        return cmd


@pytest.mark.timeout(60)
def test_a_real_node_through_the_adapter(tmp_path):
    node = OneNode(tmp_path / "journal.bin", held=True)
    try:
        wait_until(lambda: node.before_append > 20, 10, "ticks")
        assert node.role == "follower" and node.leader_address is None  # campaigning is held back
        node.held = False
        wait_until(lambda: node.role == "leader", 10, "a one-node leader")
        assert node.leader_address == node.selfNode.id and node.leader_node() is not None
        assert node.other_member_ids() == [] and node.match_indexes() == {}
        assert not node.on_tick_thread()
        done = threading.Event()
        result: list = []
        node._apply("x", callback=lambda res, err: (result.append((res, err)), done.set()))
        node.wake_tick()
        assert done.wait(5) and result == [("x", adapter.FAIL_REASON.SUCCESS)]
        assert node.leader_commit_index >= 2 and node.log_entries >= 2
    finally:
        node.destroy_synchronous()
