"""Binary snapshot files of a shard's state.

Layout: magic, header length (u64 LE), JSON header (each tensor described by
store/record.py's `metadata`, plus where each of its arrays lies), then the raw
little-endian bytes of every array at 64-byte aligned offsets, then an end
marker. Each array
carries a CRC32, so a truncated or corrupted file is refused with a clear
message instead of serving wrong bytes. Nothing is pickled: a snapshot may
arrive from another replica.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import OrderedDict
from io import BufferedReader, BufferedWriter
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes, record
from .errors import CorruptData
from .partitions import Layout
from .record import Tensor
from .state import ShardState
from .writeback import drop_cached, start_writeback

MAGIC = b"PSSNAP01"
FORMAT = 2  # 1 (before store/record.py) is not read: there were no deployments
END = b"PSSNAPEND"
ALIGN = 64
SYNC_EVERY = 32 << 20  # wait for the disk every this many bytes...
WRITEBACK_EVERY = 8 << 20  # ...having queued writeback of every this many


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_snapshot(
    path: str | os.PathLike[str],
    state: dict[str, Tensor],
    dedupe: OrderedDict[str, Any],
    shard: int,
    applied_index: int,
    raft_meta: dict[str, Any],
    fsync: bool = False,
) -> int:
    """Write `state` (a mapping captured by the applier) to `path`; returns bytes written."""
    entries, arrays, data_bytes = _layout(state)
    header = json.dumps(
        {
            "format": FORMAT,
            "shard": shard,
            "applied_index": applied_index,
            "raft": raft_meta,
            "tensors": entries,
            "dedupe": list(dedupe.items()),
            "data_bytes": data_bytes,
        },
        separators=(",", ":"),
    ).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        pad = _aligned(f.tell()) - f.tell()
        f.write(b"\0" * pad)
        data_start = f.tell()
        _write_arrays(f, arrays, data_start)
        return _finish(f, data_start, data_bytes, fsync)


def _layout(state: dict[str, Tensor]) -> tuple[list[dict[str, Any]], list[np.ndarray], int]:
    """Each tensor's header entry, its arrays in file order, and the data section's length."""
    arrays: list[np.ndarray] = []
    entries = []
    offset = 0
    for t in state.values():
        described = record.metadata(t, round_state=True)
        described["arrays"] = {}
        for key, arr in record.arrays(t, round_state=True).items():
            described["arrays"][key] = {
                "offset": offset,
                "nbytes": int(arr.nbytes),
                "dtype": dtypes.dtype_name(arr.dtype),
                "shape": list(arr.shape),
                "crc32": zlib.crc32(arr.data) if arr.nbytes else 0,
            }
            arrays.append(arr)
            offset = _aligned(offset + arr.nbytes)
        entries.append(described)
    return entries, arrays, offset


def _write_arrays(f: BufferedWriter, arrays: list[np.ndarray], data_start: int) -> None:
    """Each array's bytes, without copying, at its aligned offset from `data_start`."""
    unsynced = queued = 0
    for arr in arrays:
        here = f.tell() - data_start
        f.write(b"\0" * (_aligned(here) - here))
        if arr.nbytes:
            f.write(arr.data.cast("B") if arr.ndim else arr.tobytes())
            unsynced += arr.nbytes
            queued += arr.nbytes
        if queued >= WRITEBACK_EVERY:
            f.flush()
            start_writeback(f.fileno())
            queued = 0
        if unsynced >= SYNC_EVERY:
            # Keep the disk's write queue short. pysyncobj's journal is an
            # mmap: a journal page under writeback cannot be written to
            # until its I/O completes ("stable pages"), so behind hundreds
            # of MB of queued snapshot writes on a slow disk the tick
            # thread stalls for seconds and heartbeats are missed (5-14
            # term changes per 45 s of 64 MB Adam pushes with 256 MB
            # batches; none with 32 MB, at the same snapshot speed).
            f.flush()
            os.fdatasync(f.fileno())
            drop_cached(f.fileno())
            unsynced = 0


def _finish(f: BufferedWriter, data_start: int, data_bytes: int, fsync: bool) -> int:
    """Pad the data section to `data_bytes`, add the end marker; the file's length."""
    here = f.tell() - data_start
    f.write(b"\0" * (data_bytes - here))
    f.write(END)
    f.flush()
    if fsync:
        os.fsync(f.fileno())
    return f.tell()


def read_snapshot(path: str | os.PathLike[str], dedupe_window: int = 100_000) -> tuple[ShardState, int, dict[str, Any]]:
    """Load a snapshot; raises CorruptData naming what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read(f, path, dedupe_window)
    except CorruptData:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptData(f"snapshot {path} is unreadable: {e}") from None


def _read(f: BufferedReader, path: Path, dedupe_window: int) -> tuple[ShardState, int, dict[str, Any]]:
    size = os.fstat(f.fileno()).st_size
    if f.read(len(MAGIC)) != MAGIC:
        raise CorruptData(f"snapshot {path} does not start with the paramstore magic")
    (hlen,) = struct.unpack("<Q", f.read(8))
    if hlen > size:
        raise CorruptData(f"snapshot {path} is truncated (header of {hlen} bytes, file of {size})")
    header = json.loads(f.read(hlen))
    if header.get("format") != FORMAT:
        raise CorruptData(
            f"snapshot {path} has format {header.get('format')!r}; this version reads format {FORMAT} only"
        )
    data_start = _aligned(len(MAGIC) + 8 + hlen)
    if size != data_start + header["data_bytes"] + len(END):
        raise CorruptData(
            f"snapshot {path} is truncated or padded: {size} bytes, expected "
            f"{data_start + header['data_bytes'] + len(END)}"
        )
    state = ShardState(header["shard"], dedupe_window)
    for d in header["tensors"]:
        arrays = {}
        for key, a in d["arrays"].items():
            f.seek(data_start + a["offset"])
            buf = np.empty(a["nbytes"], dtype=np.uint8)
            if f.readinto(buf.data) != a["nbytes"]:
                raise CorruptData(f"snapshot {path}: tensor {d['name']!r} {key} is truncated")
            if (zlib.crc32(buf.data) if a["nbytes"] else 0) != a["crc32"]:
                raise CorruptData(f"snapshot {path}: tensor {d['name']!r} {key} fails its checksum")
            arr = buf.view(dtypes.dtype_of(a["dtype"])).reshape(a["shape"])
            arr.flags.writeable = False
            arrays[key] = arr
        state.tensors[d["name"]] = record.from_metadata(d, arrays)
    f.seek(data_start + header["data_bytes"])
    if f.read(len(END)) != END:
        raise CorruptData(f"snapshot {path} lacks its end marker (truncated?)")
    state.dedupe = OrderedDict((rid, outcome) for rid, outcome in header["dedupe"])
    state.members = dict(header["raft"].get("members", {}))
    state.layouts = {d["name"]: Layout.from_json(d) for d in header["raft"].get("layouts", [])}
    state.open_rounds = {n for n, t in state.tensors.items() if t.round is not None}
    return state, header["applied_index"], header["raft"]
