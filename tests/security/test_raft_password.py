"""pysyncobj unpickles whatever reaches its Raft port. With a password, a raw
pickle frame is refused before it is ever unpickled; without one (loopback
only, by our config rules) the same frame runs: this test shows both."""

import contextlib
import os
import pickle
import socket
import struct
import zlib

import pytest

from store.commands import Put
from store.config import config_from_mapping
from store.node import Store
from tests.ports import free_range
from tests.waiting import wait_until


class Exploit:
    """Unpickling this creates a marker directory (a directory: no file handle is left open)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def start_store(tmp_path, password):
    base = free_range(4)
    cfg = config_from_mapping(
        {
            "cluster": {"shards": 1, "replication": 1},
            "nodes": [
                {
                    "id": "n1",
                    "http": f"127.0.0.1:{base}",
                    "raft": f"127.0.0.1:{base + 1}",
                    "data": f"127.0.0.1:{base + 2}",
                }
            ],
            "node": {"id": "n1", "data_dir": str(tmp_path / "data")},
            "raft": {"password": password} if password else {},
        }
    )
    store = Store(cfg)
    store.start()
    wait_until(store.is_ready, 15, "single replica ready")
    return store, cfg.node.raft_address(0)


def send_raw_pickle(addr, marker: str) -> None:
    frame = zlib.compress(pickle.dumps(Exploit(marker)), 3)
    with socket.create_connection((addr.host, addr.port), timeout=5) as s:
        s.sendall(struct.pack("i", len(frame)) + frame)
        s.settimeout(1.0)
        with contextlib.suppress(TimeoutError, ConnectionError):
            s.recv(1)


@pytest.mark.parametrize("password, runs", [(None, True), ("s3cret-raft", False)])
def test_raw_pickle_frame_to_raft_port(tmp_path, password, runs):
    store, addr = start_store(tmp_path, password)
    marker = str(tmp_path / "pwned")
    try:
        send_raw_pickle(addr, marker)
        if runs:  # the frame format is right: without a password it really executes
            wait_until(lambda: os.path.exists(marker), 10, "the unauthenticated frame to run")
        else:
            # a later authenticated write proves the replica processed its socket events since
            assert store.write(Put(name="w", dtype="float32", shape=(1,), data=b"\0" * 4)).result(10)
            assert not os.path.exists(marker), "an unauthenticated pickle ran on a password-protected port"
    finally:
        store.close()


def test_password_required_off_loopback():
    from store.errors import ConfigError

    cfg = config_from_mapping(
        {
            "nodes": [{"id": "n1", "http": "10.0.0.1:8700", "raft": "10.0.0.1:9700"}],
            "node": {"id": "n1", "data_dir": "/tmp/never-used"},
        }
    )
    with pytest.raises(ConfigError, match=r"raft\.password"):
        Store(cfg)
