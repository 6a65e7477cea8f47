"""A stopped replica's Raft journal flipped or overwritten: the replica
refuses to start with a one-line message naming the file and what to do; the
others keep serving; done as told, it catches up with the right bytes. Its
last entry cut short (a torn tail) is cut off at start with a log line."""

import shutil
import struct

import numpy as np
import pytest

from tests.cluster.harness import wait_version_everywhere
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

MARK = np.full(64, 1234.5, np.float32)


def end_offset(path) -> int:
    return struct.unpack("<I", path.read_bytes()[36:40])[0]


def durable_mark(path) -> int:
    return struct.unpack("<Q", path.read_bytes()[16:24])[0]


def truncate_mid_entry(data: bytearray) -> bytearray:
    end = struct.unpack("<I", data[36:40])[0]
    return data[: end - 7]


def torn_last_entry(data: bytearray) -> bytearray:
    """What a power cut mid-batch leaves: the header of the new batch (mark at
    the batch's start) reached the disk, the end of its record did not."""
    end = struct.unpack("<I", data[36:40])[0]
    (size,) = struct.unpack("<I", data[end - 4 : end])
    data[16:24] = struct.pack("<Q", end - size - 8)
    return data[: end - 7]


def flip_value_byte(data: bytearray) -> bytearray:
    pattern = MARK[:1].tobytes().decode("latin1").encode("utf-8")  # protocol 2 pickles bytes as text
    i = data.rfind(pattern)
    assert i > 0, "the marker value is not in the journal"
    data[i + 1] ^= 0x01  # 1234.5 becomes another float; the pickle stays valid
    return data


def garbage_header(data: bytearray) -> bytearray:
    data[0:40] = b"\xa5" * 40
    return data


DAMAGE = {
    "truncated mid-entry": (truncate_mid_entry, "is truncated"),
    "flipped value byte": (flip_value_byte, "fails its CRC32"),
    "garbage header": (garbage_header, "no pysyncobj journal header"),
}


def test_damaged_journal_is_refused_then_rebuilt_from_peers(make_cluster):
    c = make_cluster(shards=1)
    for i in range(5):
        assert c.put("n1", "w", np.full(64, i, np.float32)).status_code in (200, 201)
    assert c.put("n2", "w", MARK).status_code == 200
    wait_version_everywhere(c, "w", 6)
    # an idle journal's durable mark reaches its end within a second: damage is corruption, not a torn tail
    wait_until(
        lambda: (
            durable_mark(c.tmp / "n3" / "shard-0" / "journal.bin")
            == end_offset(c.tmp / "n3" / "shard-0" / "journal.bin")
        ),
        10,
        "n3's journal settled",
    )
    c.kill("n3")
    shard_dir = c.tmp / "n3" / "shard-0"
    journal = shard_dir / "journal.bin"
    pristine = journal.read_bytes()
    version = 6
    for what, (damage, words) in DAMAGE.items():
        journal.write_bytes(bytes(damage(bytearray(pristine))))
        c.start("n3")
        assert c.procs["n3"].wait(30) == 3, what
        c.procs.pop("n3")
        last = c.log_tail("n3", 1)
        assert last.startswith("paramstore: cannot start: Raft journal ") and str(journal) in last, last
        assert words in last and f"move {shard_dir} away" in last, last
        print(f"{what}: exit 3, {last}")
        # the others keep serving, and serve what was written
        version += 1
        r = c.put("n1", "w", np.full(64, version, np.float32))
        assert r.status_code == 200 and r.json()["version"] == version, r.text
        for nid in ("n1", "n2"):
            got, v = c.get(nid, "w", consistency="linearizable")
            assert v == version and got[0] == version
    # a last entry cut short, as a power cut mid-batch leaves it: cut off, logged, caught up
    journal.write_bytes(bytes(torn_last_entry(bytearray(pristine))))
    c.restart("n3", timeout=40)
    assert "cut a torn tail" in c.log_tail("n3", 200)
    wait_until(lambda: c.get("n3", "w")[1] == version, 20, "n3 caught up after its torn tail")
    c.kill("n3")
    journal.write_bytes(bytes(garbage_header(bytearray(pristine))))
    # as the message says: move the shard directory away and restart
    shutil.move(shard_dir, c.tmp / "n3-shard-0.damaged")
    c.restart("n3", timeout=40)
    wait_until(lambda: c.get("n3", "w")[1] == version, 20, "n3 caught up from its peers")
    digests = {nid: c.digest(nid, "w") for nid in c.ids}
    assert len(set(digests.values())) == 1, digests
