"""store/hashed_send.py: a file sent in mapped windows arrives whole and is
hashed exactly once, byte for byte, to a socket and to a file."""

from __future__ import annotations

import hashlib
import mmap
import socket
import threading
from pathlib import Path

import pytest

from store import hashed_send


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashed_send, "WINDOW", 2 * mmap.ALLOCATIONGRANULARITY)
    monkeypatch.setattr(hashed_send, "SLICE", mmap.PAGESIZE)  # several slices per window


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 8193, 50_000])
def test_a_file_in_windows_arrives_whole_and_hashed_once(tmp_path: Path, small_windows: None, size: int) -> None:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    src = tmp_path / "src"
    src.write_bytes(data)
    a, b = socket.socketpair()
    got = bytearray()

    def drain() -> None:
        while chunk := b.recv(1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    hasher = hashlib.sha256()
    with open(src, "rb") as f:
        hashed_send.send_file_hashed(f, a, size, hasher)
    a.close()
    reader.join(10)
    b.close()
    assert bytes(got) == data and hasher.hexdigest() == hashlib.sha256(data).hexdigest()

    to_file, hasher = tmp_path / "copy", hashlib.sha256()
    with open(src, "rb") as f, open(to_file, "wb") as out:
        hashed_send.send_file_hashed(f, out, size, hasher)
    assert to_file.read_bytes() == data and hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_peer_that_goes_away_stops_the_send(tmp_path: Path, small_windows: None) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 40_000)
    a, b = socket.socketpair()
    b.close()
    with open(src, "rb") as f, pytest.raises(OSError):
        hashed_send.send_file_hashed(f, a, 40_000, hashlib.sha256())
    a.close()


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_large_file_adds_about_one_slice_to_the_senders_rss(tmp_path: Path) -> None:
    size = 48 << 20
    src = tmp_path / "big"
    with open(src, "wb") as f:
        f.write(b"\x5a" * size)
    a, b = socket.socketpair()
    reader = threading.Thread(target=lambda: [None for _ in iter(lambda: b.recv(1 << 20), b"")])
    reader.start()
    base, peak = _rss_file_kb(), [0]

    class Sampling:
        def __init__(self) -> None:
            self.h = hashlib.sha256()

        def update(self, data: bytes | memoryview) -> None:
            self.h.update(data)
            peak[0] = max(peak[0], _rss_file_kb() - base)

    with open(src, "rb") as f:
        hashed_send.send_file_hashed(f, a, size, Sampling())
    a.close()
    reader.join(30)
    b.close()
    assert peak[0] < 8 << 10, f"the send held {peak[0] // 1024} MB of the file mapped"
