"""store/journal.py against journals written by a real (one-node) pysyncobj
SyncObj, then truncated, overwritten or flipped."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated

from store.commands import Inline, Noop, Put, to_log
from store.errors import CorruptData
from store.journal import check_journal, content_crc, seal
from tests.ports import free_range
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
VALUE = np.full(16, 1234.5, np.float32)


class Register(SyncObj):
    def __init__(self, journal: Path) -> None:
        conf = SyncObjConf(
            journalFile=str(journal),
            appendEntriesPeriod=0.02,
            raftMinTimeout=0.1,
            raftMaxTimeout=0.2,
            connectionTimeout=0.5,
            autoTickPeriod=0.005,
        )
        super().__init__(f"127.0.0.1:{free_range(1)}", [], conf)
        self.applied: list[tuple] = []

    @replicated
    def _apply(self, entry: tuple) -> None:  # the shape of ShardReplica's one replicated method
        self.applied.append(entry)


def write_journal(path: Path, cmds: list) -> None:
    node = Register(path)
    try:
        wait_until(lambda: node._isLeader(), 10, "a one-node leader")
        for cmd in cmds:
            node._apply(cmd, sync=True, timeout=5)
    finally:
        node.destroy_synchronous()


def put(i: int, value: np.ndarray) -> tuple:
    return to_log(
        Put(
            name=f"t{i}",
            dtype="float32",
            shape=(value.size,),
            rid=f"r{i}",
            optimizer={"type": "adam", "lr": 0.01},
            data=Inline(value.tobytes()),
        )
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("journal")
    write_journal(
        d / "journal.bin", [put(i, np.full(16, i, np.float32)) for i in range(5)] + [put(5, VALUE), to_log(Noop())]
    )
    return d


@pytest.fixture
def journal(pristine, tmp_path) -> Path:
    d = tmp_path / "shard-0"
    shutil.copytree(pristine, d)
    return d / "journal.bin"


def end_offset(path: Path) -> int:
    return struct.unpack("<I", path.read_bytes()[36:40])[0]


def damage(path: Path, fn) -> None:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data) or data))


def refused(path: Path, *words: str) -> str:
    with pytest.raises(CorruptData) as e:
        check_journal(path)
    msg = e.value.detail
    assert str(path) in msg and "move " in msg and "catch up from its peers" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_an_intact_journal_passes(journal):
    assert check_journal(journal) >= 8  # pysyncobj's first no-op, leader no-ops, our 7 commands


def test_truncated_mid_entry(journal):
    damage(journal, lambda d: d[: end_offset(journal) - 7])
    refused(journal, "truncated")


def test_truncated_inside_the_header(journal):
    damage(journal, lambda d: d[:20])
    refused(journal, "truncated", "header")


def test_garbage_header(journal):
    damage(journal, lambda d: d.__setitem__(slice(0, 40), os.urandom(40)))
    refused(journal, "no pysyncobj journal header")


def test_end_offset_past_the_file(journal):
    damage(journal, lambda d: d.__setitem__(slice(36, 40), struct.pack("<I", len(d) + 100)))
    refused(journal, "truncated")


def test_flipped_value_byte_fails_the_crc(journal):
    # protocol 2 pickles bytes as latin-1 text (UTF-8 encoded): find 1234.5's last copy
    pattern = VALUE[:1].tobytes().decode("latin1").encode("utf-8")

    def flip(d):
        i = d.rfind(pattern)
        assert i > 0
        d[i + 1] ^= 0x01  # 'P' -> 'Q': still valid text, another float

    damage(journal, flip)
    refused(journal, "CRC32")


def test_overwritten_size_field(journal):
    damage(journal, lambda d: d.__setitem__(slice(40, 44), struct.pack("<I", 7)))
    refused(journal, "entry 1", "size")


def test_zeroed_record(journal):
    """What a lost page looks like after a crash of the machine."""
    end = end_offset(journal)
    damage(journal, lambda d: d.__setitem__(slice(end - 300, end), bytes(300)))
    refused(journal)


def test_an_executable_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "journal.bin"
    write_journal(path, [put(0, VALUE)])
    from pysyncobj.journal import FileJournal

    j = FileJournal(str(path))
    j.add(b"\x00" + pickle.dumps((0, (Evil(),)), 2), len(j) + 1, j[-1][2])
    j._destroy()
    refused(path, "refers to", "system")
    assert not marker.exists()


def test_damaged_or_missing_meta(journal):
    meta = Path(str(journal) + ".meta")
    saved = meta.read_bytes()
    meta.write_bytes(saved[:-3])
    refused(journal, ".meta", "does not decode")
    meta.write_bytes(pickle.dumps({"currentTerm": "x"}, 2))
    refused(journal, ".meta")
    meta.unlink()
    refused(journal, ".meta", "missing")


def test_unsealed_commands_are_refused(tmp_path):
    """Journals of paramstore before typed commands (dicts) are among these."""
    path = tmp_path / "journal.bin"
    write_journal(path, [{"op": "put", "name": "legacy", "data": {"inline": b"\x00" * 8}}])
    refused(path, "not a sealed paramstore command")


def test_seal_is_canonical_and_strict():
    crc, data = put(1, VALUE)
    again = pickle.loads(pickle.dumps((crc, data), 2))
    assert again == (crc, data) and content_crc(again[1]) == crc
    assert seal({"a": [1]})[0] != seal({"a": (1,)})[0] != seal({"a": "1"})[0]
    for bad in (np.float32(1), np.zeros(2), {1, 2}, object()):
        with pytest.raises(TypeError):
            seal(("put", bad))


def test_empty_bytes_read_back_and_bytes_from_arguments_do_not() -> None:
    from store.journal import plain_loads

    assert plain_loads(pickle.dumps((b"", b"x"), 2)) == (b"", b"x")
    built = b"\x80\x02c__builtin__\nbytes\nK\x05\x85R."  # bytes(5): arguments are refused
    with pytest.raises(pickle.UnpicklingError, match="from arguments"):
        plain_loads(built)
