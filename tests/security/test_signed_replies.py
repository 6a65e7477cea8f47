"""Signed `snapshot` and `tables` replies on the data path (store/datapath.py,
store/peer_auth.py): a joiner installs only what a replica holding the
cluster secret sent for its very request. A fake server on a dead peer's port
(unsigned, signed with another secret, or replaying an authentic reply) and a
byte altered in transit are refused, the message names the peer, and nothing
is left where the joiner would install it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store import joining
from store.config import Address, NodeConfig
from store.datapath import DataPathClient, DataPathServer
from store.membership import JoinPlan
from store.payloads import PayloadStore
from store.peer_auth import PeerAuth
from tests.ports import free_range

SECRET = b"signed-replies-secret"
SNAPSHOT = os.urandom(300_000) + b"SNAPSHOT-MARK" + os.urandom(1000)
TABLE_FILE = b"TABLE-BYTES" * 2000


@pytest.fixture
def real(tmp_path: Path) -> Iterator[Address]:
    """A real replica's data path serving SNAPSHOT and a one-table checkpoint."""
    snap = tmp_path / "source-snapshot.bin"
    snap.write_bytes(SNAPSHOT)

    def tables(shard: int) -> Path:
        out = tmp_path / f"checkpoint-{os.urandom(4).hex()}"
        (out / "t@1").mkdir(parents=True)
        (out / "t@1" / "000001.sst").write_bytes(TABLE_FILE)
        (out / "registry.json").write_bytes(b"{}")
        return out

    port = free_range(1)
    srv = DataPathServer(
        Address("127.0.0.1", port),
        {0: PayloadStore(tmp_path / "p")},
        SECRET,
        max_size=1 << 20,
        snapshot_source=lambda shard: snap,
        tables_source=tables,
    )
    srv.start()
    yield Address("127.0.0.1", port)
    srv.close()


def fake_server(answer: Callable[[bytes], bytes]) -> tuple[Address, Callable[[], None]]:
    """A server on a free port that reads one header line and answers
    `answer(header line)` whatever it says: someone squatting a dead peer's port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(1)
                    if not chunk:
                        break
                    line += chunk
                conn.sendall(answer(line))

    threading.Thread(target=serve, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return Address("127.0.0.1", listener.getsockname()[1]), close


def tampering_proxy(target: Address, flip_after: bytes) -> tuple[Address, Callable[[], None]]:
    """Relays requests to `target` and its answers back, with the byte just
    after the first `flip_after` in the answer flipped: a change in transit."""

    def answer(line: bytes) -> bytes:
        with socket.create_connection((target.host, target.port), timeout=10) as s:
            s.sendall(line)
            got = bytearray()
            while chunk := s.recv(1 << 16):
                got += chunk
        at = got.index(flip_after) + len(flip_after)
        got[at] ^= 0x01
        return bytes(got)

    return fake_server(answer)


def forged_snapshot(secret: bytes | None, body: bytes) -> Callable[[bytes], bytes]:
    """Answers a snapshot request with `body`, signed under `secret` (None: unsigned, the old format)."""

    def answer(line: bytes) -> bytes:
        nonce = json.loads(line)["nonce"]
        head: dict[str, object] = {"ok": True, "size": len(body)}
        end: dict[str, object] = {}
        if secret is not None:
            auth = PeerAuth(secret)
            head["mac"] = auth.reply_head_mac("snapshot", 0, nonce, len(body))
            end["mac"] = auth.reply_end_mac("snapshot", 0, nonce, len(body), hashlib.sha256(body).hexdigest())
        return json.dumps(head).encode() + b"\n" + body + json.dumps(end).encode() + b"\n"

    return answer


def test_an_authentic_snapshot_and_tables_arrive_whole(real: Address, tmp_path: Path) -> None:
    client = DataPathClient(SECRET, timeout=10)
    dest = tmp_path / "j" / "snapshot.bin"
    dest.parent.mkdir()
    assert client.fetch_snapshot(real, 0, dest) == len(SNAPSHOT)
    assert dest.read_bytes() == SNAPSHOT
    client.fetch_tables(real, 0, tmp_path / "j" / "tables")
    assert (tmp_path / "j" / "tables" / "t@1" / "000001.sst").read_bytes() == TABLE_FILE


@pytest.mark.parametrize(
    "forger",
    [
        forged_snapshot(None, b"forged" * 1000),
        forged_snapshot(b"not-the-cluster-secret", b"forged" * 1000),
    ],
    ids=["unsigned", "other-secret"],
)
def test_a_fake_server_on_a_dead_peers_port_cannot_feed_a_joiner(
    forger: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    addr, close = fake_server(forger)
    try:
        node = NodeConfig("n2", Address("127.0.0.1", 1), Address("127.0.0.1", 2), addr)
        plan = JoinPlan(shards={0: (node,)}, snapshot_sources={0: node})
        client = DataPathClient(SECRET, timeout=10)
        with pytest.raises(ConnectionError, match="failed authentication") as refused:
            joining.download_snapshots(plan, client, lambda shard: tmp_path)
        assert str(addr) in str(refused.value)  # the joiner names the peer
        assert list(tmp_path.iterdir()) == []  # neither snapshot.bin nor a partial one
    finally:
        close()


def test_an_authentic_reply_replayed_to_another_request_is_refused(real: Address, tmp_path: Path) -> None:
    captured = bytearray()

    def record(line: bytes) -> bytes:
        with socket.create_connection((real.host, real.port), timeout=10) as s:
            s.sendall(line)
            while chunk := s.recv(1 << 16):
                captured.extend(chunk)
        return bytes(captured)

    addr, close = fake_server(record)
    client = DataPathClient(SECRET, timeout=10)
    try:
        client.fetch_snapshot(addr, 0, tmp_path / "first.bin")  # relayed faithfully: accepted
    finally:
        close()
    replayer, close = fake_server(lambda line: bytes(captured))
    try:
        with pytest.raises(ConnectionError, match="failed authentication") as refused:
            client.fetch_snapshot(replayer, 0, tmp_path / "second.bin")
        assert str(replayer) in str(refused.value)
        assert not (tmp_path / "second.bin").exists()
    finally:
        close()


def test_a_snapshot_altered_in_transit_is_refused_after_the_last_byte(real: Address, tmp_path: Path) -> None:
    addr, close = tampering_proxy(real, b"SNAPSHOT-MARK")
    joiner = tmp_path / "joiner"
    joiner.mkdir()
    try:
        with pytest.raises(ConnectionError, match="do not match the signed digest") as refused:
            DataPathClient(SECRET, timeout=10).fetch_snapshot(addr, 0, joiner / "snapshot.bin")
        assert str(addr) in str(refused.value)
        assert list(joiner.iterdir()) == []
    finally:
        close()


def test_tables_altered_in_transit_or_forged_are_refused(real: Address, tmp_path: Path) -> None:
    client = DataPathClient(SECRET, timeout=10)
    proxy, close = tampering_proxy(real, b"TABLE-BYTES" * 10)
    try:
        with pytest.raises(ConnectionError, match="do not match the signed digest") as refused:
            client.fetch_tables(proxy, 0, tmp_path / "tables.fetching")
        assert str(proxy) in str(refused.value)
        assert not (tmp_path / "tables.fetching").exists()
    finally:
        close()

    def forged(line: bytes) -> bytes:  # the old, unsigned format of a real table stream
        head = json.dumps({"name": "t@1/000001.sst", "size": 4}).encode()
        return b'{"ok": true}\n' + head + b"\nEVIL" + b'{"end": 1}\n'

    fake, close = fake_server(forged)
    try:
        with pytest.raises(ConnectionError, match="failed authentication") as refused:
            client.fetch_tables(fake, 0, tmp_path / "tables.fetching")
        assert str(fake) in str(refused.value)
        assert not (tmp_path / "tables.fetching").exists()
    finally:
        close()
        shutil.rmtree(tmp_path / "tables.fetching", ignore_errors=True)


def test_a_payload_that_does_not_hash_to_its_name_is_refused_naming_the_peer(real: Address) -> None:
    """`get` replies are checked by content: a squatter's bytes raise (the
    applier then asks the next peer) instead of reaching the payload store."""
    wanted = hashlib.sha256(b"the real payload").hexdigest()
    forged = b"a forged payload"
    fake, close = fake_server(lambda line: json.dumps({"ok": True, "size": len(forged)}).encode() + b"\n" + forged)
    try:
        with pytest.raises(ConnectionError, match="hash to something else") as refused:
            DataPathClient(SECRET, timeout=10).fetch(fake, 0, wanted)
        assert str(fake) in str(refused.value)
    finally:
        close()
    data = b"a payload a real peer holds"
    client = DataPathClient(SECRET, timeout=10)
    client.replicate([real], 0, hashlib.sha256(data).hexdigest(), data, need=1, timeout=10)
    assert bytes(client.fetch(real, 0, hashlib.sha256(data).hexdigest()) or b"") == data


def test_a_get_reply_announcing_more_than_the_payload_cap_is_refused_before_allocating() -> None:
    announced = 1 << 40  # a buffer this size would exhaust memory, or fail allocating it
    fake, close = fake_server(lambda line: json.dumps({"ok": True, "size": announced}).encode() + b"\n")
    try:
        with pytest.raises(ConnectionError, match="bad size") as refused:
            DataPathClient(SECRET, timeout=10, max_size=1 << 20).fetch(fake, 0, "0" * 64)
        assert str(fake) in str(refused.value)
    finally:
        close()
