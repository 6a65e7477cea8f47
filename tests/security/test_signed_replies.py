"""Signed `snapshot` and `tables` replies on the data path (store/datapath.py,
store/peer_auth.py): a joiner installs only what a replica holding the
cluster secret sent for its very request. A fake server on a dead peer's port
(unsigned, signed with another secret, or replaying an authentic reply) and a
byte altered in transit are refused, the message names the peer, and nothing
is left where the joiner would install it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from store import content_id, joining, stream_digest
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


@contextmanager
def fake_server(answer: Callable[[bytes], bytes]) -> Iterator[Address]:
    """A server on a free port that reads one header line and answers
    `answer(header line)` whatever it says: someone squatting a dead peer's
    port. Closed after the block."""
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
    try:
        yield Address("127.0.0.1", listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()


def exchange(target: Address, line: bytes) -> bytearray:
    """`line` sent to `target`, and all it answers."""
    with socket.create_connection((target.host, target.port), timeout=10) as s:
        s.sendall(line)
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
    return got


def tampering(target: Address, flip_after: bytes) -> Callable[[bytes], bytes]:
    """Relays requests to `target` and its answers back, with the byte just
    after the first `flip_after` in the answer flipped: a change in transit."""

    def answer(line: bytes) -> bytes:
        got = exchange(target, line)
        at = got.index(flip_after) + len(flip_after)
        got[at] ^= 0x01
        return bytes(got)

    return answer


def forged_snapshot(
    secret: bytes | None, body: bytes, alg: str = stream_digest.SHA256, announce: str | None = None
) -> Callable[[bytes], bytes]:
    """Answers a snapshot request with `body`, signed under `secret` (None:
    unsigned, the old format) over its `alg` digest; the head names `announce`
    (default: `alg`, and nothing for SHA-256, as replicas before BLAKE3 do)."""

    def answer(line: bytes) -> bytes:
        nonce = json.loads(line)["nonce"]
        head: dict[str, object] = {"ok": True, "size": len(body)}
        named = announce if announce is not None else (None if alg == stream_digest.SHA256 else alg)
        if named is not None:
            head["digest"] = named
        end: dict[str, object] = {}
        if secret is not None:
            auth = PeerAuth(secret)
            head["mac"] = auth.reply_head_mac("snapshot", 0, nonce, len(body))
            hasher = auth.stream_digest(alg)
            hasher.update(body)
            end["mac"] = auth.reply_end_mac("snapshot", 0, nonce, len(body), hasher.hexdigest())
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
        forged_snapshot(b"not-the-cluster-secret", b"forged" * 1000, alg=stream_digest.B3),
    ],
    ids=["unsigned", "other-secret", "other-secret-b3"],
)
def test_a_fake_server_on_a_dead_peers_port_cannot_feed_a_joiner(
    forger: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    with fake_server(forger) as addr:
        node = NodeConfig("n2", Address("127.0.0.1", 1), Address("127.0.0.1", 2), addr)
        plan = JoinPlan(shards={0: (node,)}, snapshot_sources={0: node})
        client = DataPathClient(SECRET, timeout=10)
        with pytest.raises(ConnectionError, match="failed authentication") as refused:
            joining.download_snapshots(plan, client, lambda shard: tmp_path)
        assert str(addr) in str(refused.value)  # the joiner names the peer
        assert list(tmp_path.iterdir()) == []  # neither snapshot.bin nor a partial one


def test_an_authentic_reply_replayed_to_another_request_is_refused(real: Address, tmp_path: Path) -> None:
    seen: list[bytes] = []
    client = DataPathClient(SECRET, timeout=10)
    with fake_server(relaying(real, seen)) as addr:
        client.fetch_snapshot(addr, 0, tmp_path / "first.bin")  # relayed faithfully: accepted
    captured = seen[1]
    with fake_server(lambda line: captured) as replayer:
        with pytest.raises(ConnectionError, match="failed authentication") as refused:
            client.fetch_snapshot(replayer, 0, tmp_path / "second.bin")
        assert str(replayer) in str(refused.value)
        assert not (tmp_path / "second.bin").exists()


def test_a_snapshot_altered_in_transit_is_refused_after_the_last_byte(real: Address, tmp_path: Path) -> None:
    joiner = tmp_path / "joiner"
    joiner.mkdir()
    with fake_server(tampering(real, b"SNAPSHOT-MARK")) as addr:
        with pytest.raises(ConnectionError, match="do not match the signed digest") as refused:
            DataPathClient(SECRET, timeout=10).fetch_snapshot(addr, 0, joiner / "snapshot.bin")
        assert str(addr) in str(refused.value)
        assert list(joiner.iterdir()) == []


def test_tables_altered_in_transit_or_forged_are_refused(real: Address, tmp_path: Path) -> None:
    client = DataPathClient(SECRET, timeout=10)
    with fake_server(tampering(real, b"TABLE-BYTES" * 10)) as proxy:
        with pytest.raises(ConnectionError, match="do not match the signed digest") as refused:
            client.fetch_tables(proxy, 0, tmp_path / "tables.fetching")
        assert str(proxy) in str(refused.value)
        assert not (tmp_path / "tables.fetching").exists()

    def forged(line: bytes) -> bytes:  # the old, unsigned format of a real table stream
        head = json.dumps({"name": "t@1/000001.sst", "size": 4}).encode()
        return b'{"ok": true}\n' + head + b"\nEVIL" + b'{"end": 1}\n'

    try:
        with fake_server(forged) as fake, pytest.raises(ConnectionError, match="failed authentication") as refused:
            client.fetch_tables(fake, 0, tmp_path / "tables.fetching")
        assert str(fake) in str(refused.value)
        assert not (tmp_path / "tables.fetching").exists()
    finally:
        shutil.rmtree(tmp_path / "tables.fetching", ignore_errors=True)


@pytest.mark.parametrize("kind", [content_id.B3, content_id.SHA256])
def test_a_payload_that_does_not_hash_to_its_name_is_refused_naming_the_peer(real: Address, kind: str) -> None:
    """`get` replies are checked by content, in the algorithm the id names: a
    squatter's bytes raise (the applier then asks the next peer) instead of
    reaching the payload store."""
    wanted = content_id.id_of(b"the real payload", kind)
    forged = b"a forged payload"
    with fake_server(lambda line: json.dumps({"ok": True, "size": len(forged)}).encode() + b"\n" + forged) as fake:
        with pytest.raises(ConnectionError, match="hash to something else") as refused:
            DataPathClient(SECRET, timeout=10).fetch(fake, 0, wanted)
        assert str(fake) in str(refused.value)
    data = b"a payload a real peer holds"
    client = DataPathClient(SECRET, timeout=10)
    client.replicate([real], 0, content_id.id_of(data, kind), data, need=1, timeout=10)
    assert bytes(client.fetch(real, 0, content_id.id_of(data, kind)) or b"") == data


def test_a_get_reply_announcing_more_than_the_payload_cap_is_refused_before_allocating() -> None:
    announced = 1 << 40  # a buffer this size would exhaust memory, or fail allocating it
    with fake_server(lambda line: json.dumps({"ok": True, "size": announced}).encode() + b"\n") as fake:
        with pytest.raises(ConnectionError, match="bad size") as refused:
            DataPathClient(SECRET, timeout=10, max_size=1 << 20).fetch(fake, 0, "0" * 64)
        assert str(fake) in str(refused.value)


def relaying(target: Address, seen: list[bytes]) -> Callable[[bytes], bytes]:
    """A faithful relay to `target` that records each request line and answer."""

    def answer(line: bytes) -> bytes:
        got = bytes(exchange(target, line))
        seen.extend([line, got])
        return got

    return answer


def _head(answer: bytes) -> dict[str, object]:
    head = json.loads(answer[: answer.index(b"\n")])
    assert isinstance(head, dict)
    return head


@pytest.mark.parametrize("asks", [stream_digest.B3, None], ids=["b3", "sha256-like-an-earlier-joiner"])
def test_a_replica_answers_in_the_digest_its_joiner_asks_for(real: Address, tmp_path: Path, asks: str | None) -> None:
    """BLAKE3 by default; a joiner of an earlier version (no `digest` field)
    gets the SHA-256 form it knows. Each arrives whole and verified."""
    seen: list[bytes] = []
    client = DataPathClient(SECRET, timeout=10)
    client.stream_digest = asks
    with fake_server(relaying(real, seen)) as addr:
        assert client.fetch_snapshot(addr, 0, tmp_path / "s.bin") == len(SNAPSHOT)
        client.fetch_tables(addr, 0, tmp_path / "tables")
    assert (tmp_path / "s.bin").read_bytes() == SNAPSHOT
    assert (tmp_path / "tables" / "t@1" / "000001.sst").read_bytes() == TABLE_FILE
    for request, answer in zip(seen[::2], seen[1::2], strict=True):
        assert json.loads(request).get("digest") == asks
        assert _head(answer).get("digest") == asks  # absent for SHA-256: what earlier joiners read


def test_a_snapshot_from_a_replica_of_an_earlier_version_is_accepted(tmp_path: Path) -> None:
    """Rolling upgrades: a source that ignores `digest` and signs SHA-256."""
    body = os.urandom(50_000)
    with fake_server(forged_snapshot(SECRET, body)) as addr:
        assert DataPathClient(SECRET, timeout=10).fetch_snapshot(addr, 0, tmp_path / "s.bin") == len(body)
    assert (tmp_path / "s.bin").read_bytes() == body


@pytest.mark.parametrize(
    ("alg", "announce", "refusal"),
    [
        (stream_digest.SHA256, stream_digest.B3, "do not match the signed digest"),  # head altered: b3 added
        (stream_digest.B3, stream_digest.SHA256, "do not match the signed digest"),  # head altered: b3 removed
        (stream_digest.B3, "md5", "unknown digest"),
    ],
    ids=["sha256-signed-b3-announced", "b3-signed-sha256-announced", "unknown"],
)
def test_a_reply_whose_head_misnames_its_digest_is_refused(
    tmp_path: Path, alg: str, announce: str, refusal: str
) -> None:
    """The trailer MAC signs the algorithm's name with the digest: a head
    changed in transit to name another algorithm installs nothing."""
    forger = forged_snapshot(SECRET, os.urandom(50_000), alg=alg, announce=announce)
    with fake_server(forger) as addr, pytest.raises(ConnectionError, match=refusal):
        DataPathClient(SECRET, timeout=10).fetch_snapshot(addr, 0, tmp_path / "s.bin")
    assert list(tmp_path.iterdir()) == []


def test_the_b3_digest_is_keyed_by_the_cluster_secret() -> None:
    """Without the secret nobody computes the digest a trailer signs (a MAC by
    itself), and one flipped byte changes it."""
    data = bytearray(os.urandom(1 << 20))

    def digest(secret: bytes, data: bytes | bytearray) -> str:
        hasher = PeerAuth(secret).stream_digest(stream_digest.B3)
        hasher.update(memoryview(data))
        assert hasher.size == len(data)
        return hasher.hexdigest()

    mine = digest(SECRET, data)
    assert mine.startswith("b3:") and len(mine) == 3 + 64
    assert mine == digest(SECRET, bytes(data))
    assert mine != digest(b"another-secret", data)
    data[12345] ^= 1
    assert mine != digest(SECRET, data)
