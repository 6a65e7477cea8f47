"""pysyncobj unpickles whatever reaches its Raft port once it has decrypted it
with the key derived from the Raft password (Fernet: the HMAC is checked
before anything is decrypted). A replica never runs without a password, and
a frame not encrypted under it is refused before it is unpickled; the same
frame encrypted with the password runs, which shows the frame is right."""

import contextlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor

from store.commands import Put
from store.config import config_from_mapping
from store.errors import ConfigError
from store.node import Store
from tests.ports import free_range
from tests.waiting import wait_until

PASSWORD = "s3cret-raft-password"


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
            "raft": {"password": password},
        }
    )
    store = Store(cfg)
    store.start()
    wait_until(store.is_ready, 15, "single replica ready")
    return store, cfg.node.raft_address(0)


def send_pickle_frame(addr, marker: str, key: str | None) -> None:
    """The exploit as pysyncobj's first frame on a connection; `key`: encrypt it
    as a peer holding that password would (None: plain, as without a password)."""
    frame = zlib.compress(pickle.dumps(Exploit(marker)), 3)
    if key is not None:
        frame = getEncryptor(key).encrypt_at_time(frame, int(time.monotonic()))
    with socket.create_connection((addr.host, addr.port), timeout=5) as s:
        s.sendall(struct.pack("i", len(frame)) + frame)
        s.settimeout(1.0)
        with contextlib.suppress(TimeoutError, ConnectionError):
            s.recv(1)


@pytest.mark.parametrize(
    "key, runs",
    [(PASSWORD, True), (None, False), ("not-the-password", False)],
    ids=["the-password", "plain", "wrong-password"],
)
def test_pickle_frame_to_raft_port(tmp_path, key, runs):
    store, addr = start_store(tmp_path, PASSWORD)
    marker = str(tmp_path / "pwned")
    try:
        send_pickle_frame(addr, marker, key)
        if runs:  # the frame is right: a peer holding the password is trusted with pickles
            wait_until(lambda: os.path.exists(marker), 10, "the authenticated frame to run")
        else:
            # a later write proves the replica processed its socket events since
            assert store.write(Put(name="w", dtype="float32", shape=(1,), data=b"\0" * 4)).result(10)
            assert not os.path.exists(marker), "an unauthenticated pickle ran on the Raft port"
    finally:
        store.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1"])
@pytest.mark.parametrize("raft", [{}, {"password": ""}], ids=["none", "empty"])
def test_a_cluster_secret_is_required_loopback_included(tmp_path, host, raft):
    cfg = config_from_mapping(
        {
            "nodes": [{"id": "n1", "http": f"{host}:8700", "raft": f"{host}:9700"}],
            "node": {"id": "n1", "data_dir": str(tmp_path / "data")},
            "raft": raft,
        }
    )
    with pytest.raises(ConfigError, match=r"raft\.password: a cluster secret is required"):
        Store(cfg)
    assert not (tmp_path / "data").exists()  # refused before anything was created


NODE_ARGS = ("--node", "n1", "--data-dir")


def test_serve_refuses_to_start_without_a_secret(tmp_path):
    base = free_range(4)
    (tmp_path / "c.toml").write_text(
        f"""[cluster]\nshards = 1\n[auth]\ninsecure_no_auth = true\n[[nodes]]\nid = "n1"\nhttp = "127.0.0.1:{base}"\n"""
        f"""raft = "127.0.0.1:{base + 1}"\ndata = "127.0.0.1:{base + 3}"\n"""
    )
    env = {k: v for k, v in os.environ.items() if k != "PARAMSTORE_RAFT_PASSWORD"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "api.cli",
            "serve",
            "--config",
            str(tmp_path / "c.toml"),
            *NODE_ARGS,
            str(tmp_path / "d"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "raft.password: a cluster secret is required" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
