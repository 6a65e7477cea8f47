import json
import struct

import numpy as np
import pytest

from store.commands import Grad, Inline, Put
from store.errors import CorruptData
from store.snapshot import read_snapshot, write_snapshot
from store.state import ShardState


def populated() -> ShardState:
    s = ShardState(3)
    rng = np.random.default_rng(0)
    for name, dtype, shape in [
        ("a", "float32", (5, 7)),
        ("b", "int64", (3,)),
        ("c", "float16", ()),
        ("d", "float64", (0,)),
    ]:
        arr = (rng.standard_normal(shape) * 10).astype(dtype)
        s.apply(
            Put(
                name=name,
                dtype=dtype,
                shape=shape,
                data=Inline(arr.tobytes()),
                rid=f"r-{name}",
                optimizer={"type": "adam"} if dtype == "float32" else None,
            ),
            lambda r: r.data,
        )
    s.apply(
        Grad(name="a", dtype="float32", shape=(5, 7), data=Inline(np.ones((5, 7), np.float32).tobytes())),
        lambda r: r.data,
    )
    return s


def test_round_trip_is_exact(tmp_path):
    s = populated()
    path = tmp_path / "snap.bin"
    write_snapshot(path, s.tensors, s.dedupe, 3, 42, {"entries": [], "cluster": ["x:1"]})
    loaded, index, meta = read_snapshot(path)
    assert index == 42 and meta["cluster"] == ["x:1"] and loaded.shard == 3
    assert set(loaded.tensors) == set(s.tensors)
    for name, t in s.tensors.items():
        u = loaded.tensors[name]
        assert (u.dtype, u.shape, u.version, u.optimizer) == (t.dtype, t.shape, t.version, t.optimizer)
        assert u.value.tobytes() == t.value.tobytes()
        for k, v in t.opt_state.items():
            assert np.array_equal(u.opt_state[k], v) if isinstance(v, np.ndarray) else u.opt_state[k] == v
    assert list(loaded.dedupe) == list(s.dedupe)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    s = populated()
    path = tmp_path / "snap.bin"
    write_snapshot(path, s.tensors, s.dedupe, 3, 1, {"entries": [], "cluster": []})
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-20])
    with pytest.raises(CorruptData, match="truncated"):
        read_snapshot(tmp_path / "short.bin")
    hlen = struct.unpack("<Q", data[8:16])[0]
    header = json.loads(data[16 : 16 + hlen])
    data_start = (16 + hlen + 63) // 64 * 64
    first = header["tensors"][0]["arrays"]["value"]
    flipped = bytearray(data)
    flipped[data_start + first["offset"] + first["nbytes"] // 2] ^= 0xFF
    (tmp_path / "flip.bin").write_bytes(bytes(flipped))
    with pytest.raises(CorruptData):
        read_snapshot(tmp_path / "flip.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a snapshot at all")
    with pytest.raises(CorruptData, match="magic"):
        read_snapshot(tmp_path / "junk.bin")
