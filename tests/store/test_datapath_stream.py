"""Cut-through payload replication (store/datapath.py PayloadStream) against
real data-path servers on loopback."""

import os

import pytest

from store import content_id, datapath
from store.config import Address
from store.datapath import DataPathClient, DataPathServer
from store.errors import Unavailable
from store.payloads import PayloadStore
from tests.ports import free_range

SECRET = b"stream-secret"


@pytest.fixture
def peers(tmp_path):
    base = free_range(2)
    servers, stores = [], []
    for i in range(2):
        store = PayloadStore(tmp_path / f"p{i}")
        server = DataPathServer(Address("127.0.0.1", base + i), {0: store}, SECRET, max_size=64 << 20)
        server.start()
        servers.append(server)
        stores.append(store)
    client = DataPathClient(SECRET, timeout=10)
    yield client, [Address("127.0.0.1", base + i) for i in range(2)], stores
    for s in servers:
        s.close()


def _feed(stream, data: bytes, piece: int = 1 << 16) -> None:
    view = memoryview(data)
    for i in range(0, len(data), piece):
        stream.feed(view[i : i + piece])


@pytest.mark.parametrize("kind", [content_id.B3, content_id.SHA256])
def test_a_streamed_payload_lands_on_every_peer(peers, kind):
    """BLAKE3 ids by default; SHA-256 ones as replicas of earlier versions (or
    `limits.payload_ids = "sha256"`) name them."""
    client, addrs, stores = peers
    data = os.urandom(3 << 20)
    pid = content_id.id_of(data, kind)
    assert pid.startswith("b3-") == (kind == content_id.B3)
    stream = client.stream(addrs, 0, len(data), kind)
    _feed(stream, data)
    stream.finish(pid)
    stream.wait(2, 10)
    for store in stores:
        assert bytes(store.get(pid)) == data
        assert store.path(pid).read_bytes() == data


@pytest.mark.parametrize(
    ("announced", "named"), [(content_id.B3, content_id.SHA256), (content_id.SHA256, content_id.B3)]
)
def test_a_stream_named_in_another_algorithm_than_announced_is_refused(peers, announced, named):
    """Each peer hashes with the algorithm the header announces; a trailer
    naming the bytes in another (even correctly) stores nothing."""
    client, addrs, stores = peers
    data = os.urandom(1 << 20)
    pid = content_id.id_of(data, named)
    stream = client.stream(addrs, 0, len(data), announced)
    _feed(stream, data)
    stream.finish(pid)
    with pytest.raises(Unavailable, match="refused payload"):
        stream.wait(1, 10)
    for store in stores:
        assert store.get(pid) is None


@pytest.mark.parametrize("kind", [content_id.B3, content_id.SHA256])
def test_a_byte_changed_on_the_way_is_refused(peers, kind):
    client, addrs, stores = peers
    data = bytearray(os.urandom(1 << 20))
    pid = content_id.id_of(data, kind)
    data[4321] ^= 1
    stream = client.stream(addrs, 0, len(data), kind)
    _feed(stream, bytes(data))
    stream.finish(pid)
    with pytest.raises(Unavailable, match="refused payload"):
        stream.wait(1, 10)
    for store in stores:
        assert store.get(pid) is None


def test_an_aborted_stream_leaves_nothing(peers):
    client, addrs, stores = peers
    data = os.urandom(1 << 20)
    stream = client.stream(addrs, 0, len(data))
    _feed(stream, data[: len(data) // 2])
    stream.abort()
    with pytest.raises(Unavailable, match="reached 0 of the 1"):
        stream.wait(1, 10)
    for store in stores:
        assert not any(store.root.iterdir())


def test_bytes_that_do_not_match_their_name_are_refused(peers):
    client, addrs, stores = peers
    data = os.urandom(1 << 20)
    wrong = content_id.id_of(b"something else")
    stream = client.stream(addrs, 0, len(data))
    _feed(stream, data)
    stream.finish(wrong)
    with pytest.raises(Unavailable, match="refused payload"):
        stream.wait(1, 10)
    for store in stores:
        assert store.get(wrong) is None


def test_a_sender_without_the_secret_is_refused(peers):
    _, addrs, stores = peers
    data = os.urandom(1 << 20)
    pid = content_id.id_of(data)
    intruder = DataPathClient(b"not the secret", timeout=10)
    stream = intruder.stream(addrs, 0, len(data))
    _feed(stream, data)
    stream.finish(pid)
    with pytest.raises(Unavailable):
        stream.wait(1, 10)
    for store in stores:
        assert store.get(pid) is None


def test_a_stream_nobody_finishes_gives_up(peers, monkeypatch):
    client, addrs, _ = peers
    monkeypatch.setattr(datapath, "STREAM_IDLE", 0.5)
    stream = client.stream(addrs, 0, 1 << 20)
    _feed(stream, os.urandom(1 << 19))
    with pytest.raises(Unavailable, match="Empty"):
        stream.wait(1, 10)


def test_many_open_streams_do_not_starve_each_other(peers):
    """Senders are threads of their own: 20 streams still arriving (40 senders,
    more than the client's pool) finish in any order."""
    client, addrs, stores = peers
    bodies = [os.urandom(1 << 20) for _ in range(20)]
    streams = [client.stream(addrs, 0, len(b)) for b in bodies]
    for stream, body in zip(streams, bodies, strict=True):
        _feed(stream, body)
    for stream, body in reversed(list(zip(streams, bodies, strict=True))):
        stream.finish(content_id.id_of(body))
        stream.wait(2, 5)
    for body in bodies:
        assert bytes(stores[0].get(content_id.id_of(body))) == body


def test_replicate_sends_a_complete_payload_the_same_way(peers):
    client, addrs, stores = peers
    data = os.urandom(2 << 20)
    pid = content_id.id_of(data)
    client.replicate(addrs, 0, pid, data, need=2, timeout=10)
    for store in stores:
        assert bytes(store.get(pid)) == data
    down = Address("127.0.0.1", free_range(1))  # nobody listens there
    other = os.urandom(1 << 16)
    other_id = content_id.id_of(other)
    client.replicate([addrs[0], down], 0, other_id, other, need=1, timeout=10)
    assert bytes(stores[0].get(other_id)) == other
    with pytest.raises(Unavailable, match=r"of the 2 peers a majority needs.*Connection refused"):
        client.replicate([addrs[0], down], 0, other_id, other, need=2, timeout=10)
