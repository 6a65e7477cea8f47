"""Check a shard's pysyncobj journal before Raft reads it, and seal commands
so that the check can verify their content.

pysyncobj 0.3.17's FileJournal trusts its file: the header is not checked,
a record cut short is read as a shorter command, and nothing covers a
command's bytes. Unchecked, a damaged journal either crashed the replica with
a bare `struct.error`, or let it come up serving stale data while its tick
thread failed on every tick, or applied a flipped value silently
(docs/reliability.md has the measurements). `check_journal` refuses all of
these at start, naming the file.

File layout (pysyncobj/journal.py): name (24 bytes, "PYSYNCOBJ" NUL-padded;
paramstore keeps the durable mark of store/durable_journal.py in its last 8),
version (8), format (uint32 = 1), end offset (uint32), then records of
size (uint32), index (uint64), term (uint64), command, size again.

A damaged record at or past the durable mark is the torn tail of a batch a
power cut interrupted before its fdatasync returned (nothing in it was
acknowledged): `check_journal` truncates the journal there and logs it.
Damage before the mark, or in a journal without one, refuses to start.
A command is a type byte (0 regular, 1 no-op, 2 membership, 3 version) and,
for 0/2/3, a pickle.

Nothing read from the file is executed while checking: pickles are decoded by
`_PlainUnpickler`, which builds only plain data (dict, list, tuple, str,
bytes, numbers) and looks up no class or function except the two protocol 2
and pysyncobj need (latin-1 `bytes`, pysyncobj's node class). A command that
needs anything else is refused, so pysyncobj never unpickles it either.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .durable_journal import header_bytes
from .errors import CorruptData

log = logging.getLogger(__name__)

HEADER = struct.Struct("<16sQ8sII")  # name, durable mark, version, format, end offset
SIZE = struct.Struct("<I")
INDEX_TERM = struct.Struct("<QQ")
REGULAR, NO_OP, MEMBERSHIP, VERSION = 0, 1, 2, 3
ADVICE = "move {dir} away (keep it for inspection) and restart this replica: it will catch up from its peers"


# ---- sealing -----------------------------------------------------------------
def seal(data: Any) -> tuple[int, Any]:
    """`(CRC32 of data's content, data)`: how every command paramstore
    proposes is logged. Raises TypeError for anything but plain data, which
    `check_journal` would refuse after a restart."""
    return (content_crc(data), data)


def content_crc(obj: Any) -> int:
    """CRC32 over a canonical, typed encoding of plain data."""
    parts: list[bytes] = []
    _encode(obj, parts.append)
    return zlib.crc32(b"".join(parts))


def _encode(obj: Any, out: Callable[[bytes], None]) -> None:
    t = type(obj)
    if t is str:
        data = obj.encode("utf-8", "surrogatepass")
        out(b"s%d:" % len(data))
        out(data)
    elif t is dict:
        out(b"d%d:" % len(obj))
        for k, v in obj.items():
            _encode(k, out)
            _encode(v, out)
    elif t is bytes or t is bytearray or t is memoryview:
        out(b"b%d:" % len(obj))
        out(obj)
    elif obj is None or t is bool:
        out(b"N" if obj is None else b"T" if obj else b"F")
    elif t is int:
        out(b"i%d;" % obj)
    elif t is float:
        out(b"f" + struct.pack("<d", obj))
    elif t is list or t is tuple:
        out((b"l%d:" if t is list else b"t%d:") % len(obj))
        for v in obj:
            _encode(v, out)
    else:
        raise TypeError(f"a Raft command may hold only plain data, not {t.__name__}")


# ---- checking ------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Decodes plain data only: no class or function can be looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1  # how protocol 2 spells bytes
        if (module, name) == ("__builtin__", "bytes"):
            return _empty_bytes  # how protocol 2 spells b""
        if (module, name) in (("pysyncobj.node", "TCPNode"), ("pysyncobj.node", "Node")):
            import pysyncobj.node  # membership entries carry node objects (plain attributes)

            return getattr(pysyncobj.node, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent id")


def _latin1(text: str, encoding: str) -> bytes:
    if type(text) is not str or encoding != "latin1":
        raise pickle.UnpicklingError(f"encodes with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise pickle.UnpicklingError("builds bytes from arguments")
    return b""


def plain_loads(data: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(data)).load()


class _Broken(Exception):
    def __init__(self, message: str, at: int = -1) -> None:
        super().__init__(message)
        self.at = at  # byte offset of the damaged record, -1 for the header or meta file


def check_journal(path: Path, repair: bool = True) -> int:
    """Verify `path` and its `.meta` file; returns the number of entries.
    A torn tail (see above) is cut off when `repair`, else refused.
    Raises CorruptData with a one-line message naming the file and what to do."""
    path = Path(path)
    try:
        count, last_term = _check_records(path, repair) if path.exists() else (0, 0)
        _check_meta(Path(str(path) + ".meta"), last_term)
        return count
    except _Broken as e:
        raise CorruptData(f"Raft journal {e}; {ADVICE.format(dir=path.parent)}") from None
    except OSError as e:
        raise CorruptData(f"Raft journal {path} is unreadable: {e}; {ADVICE.format(dir=path.parent)}") from None


def _check_records(path: Path, repair: bool) -> tuple[int, int]:
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        if size < HEADER.size:
            raise _Broken(f"{path} is truncated: {size} bytes, shorter than its {HEADER.size}-byte header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            name, mark, _version, fmt, end = HEADER.unpack_from(mm, 0)
            if name.rstrip(b"\0") != b"PYSYNCOBJ" or fmt != 1:
                raise _Broken(f"{path} has no pysyncobj journal header (garbage or another file)")
            try:
                if not HEADER.size <= end <= size:
                    raise _Broken(
                        f"{path} is truncated: its header says entries end at byte {end}, the file has {size}", at=size
                    )
                return _walk(path, mm, end)
            except _Broken as e:
                if not (repair and HEADER.size <= mark <= e.at):
                    raise
                reason = str(e)
            # torn tail: walk again up to the last complete record before the damage
            count, last_term, good_end = _walk_until_broken(path, mm, min(end, size))
    _truncate(path, good_end)
    log.warning(
        "Raft journal %s: cut a torn tail at byte %d (%d entries kept; written after the last "
        "fdatasync, never acknowledged): %s",
        path,
        good_end,
        count,
        reason,
    )
    return count, last_term


def _walk_until_broken(path: Path, mm: mmap.mmap, end: int) -> tuple[int, int, int]:
    """Entries up to the first damaged one: (count, last term, end offset)."""
    state: list[int] = [0, 0, HEADER.size]
    with contextlib.suppress(_Broken):
        _walk(path, mm, end, state)
    return state[0], state[1], state[2]


def _truncate(path: Path, end: int) -> None:
    """Header end and mark := `end`, durable before Raft reads the file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, header_bytes(end, end), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _walk(path: Path, mm: mmap.mmap, end: int, state: list[int] | None = None) -> tuple[int, int]:
    """Check every record up to `end`; `state` follows the last good one
    (count, term, end offset)."""
    off, count, prev_index, prev_term = HEADER.size, 0, None, 0
    while off < end:
        where = f"{path}: entry {count + 1} at byte {off}"
        if off + SIZE.size > end:
            raise _Broken(f"{where} is cut short", off)
        (n,) = SIZE.unpack_from(mm, off)
        if n < INDEX_TERM.size + 1 or off + n + 2 * SIZE.size > end:
            raise _Broken(f"{where} has an impossible size {n} (truncated or overwritten)", off)
        if SIZE.unpack_from(mm, off + SIZE.size + n)[0] != n:
            raise _Broken(f"{where}: its two size fields differ (truncated or overwritten)", off)
        index, term = INDEX_TERM.unpack_from(mm, off + SIZE.size)
        if prev_index is not None and index != prev_index + 1:
            raise _Broken(f"{where}: index {index} follows {prev_index}", off)
        if term < prev_term:
            raise _Broken(f"{where}: term {term} follows term {prev_term}", off)
        start = off + SIZE.size + INDEX_TERM.size
        problem = _command_problem(mm[start : off + SIZE.size + n])
        if problem:
            raise _Broken(f"{where} (index {index}): {problem}", off)
        prev_index, prev_term, count = index, term, count + 1
        off += n + 2 * SIZE.size
        if state is not None:
            state[:] = [count, prev_term, off]
    return count, prev_term


def _command_problem(cmd: bytes) -> str | None:
    kind = cmd[0]
    if kind == NO_OP:
        return None if len(cmd) == 1 else "a no-op entry with a payload"
    if kind not in (REGULAR, MEMBERSHIP, VERSION):
        return f"unknown command type {kind}"
    try:
        value = plain_loads(cmd[1:])
    except Exception as e:  # any decoding failure is damage
        return f"command does not decode ({type(e).__name__}: {e})"
    if kind != REGULAR:
        return None
    # (method id,) or (method id, args) or (method id, args, kwargs), as pysyncobj's @replicated makes them
    if type(value) is int:
        return None
    if (
        type(value) is not tuple
        or not 2 <= len(value) <= 3
        or type(value[0]) is not int
        or type(value[1]) is not tuple
        or (len(value) == 3 and type(value[2]) is not dict)
    ):
        return "command is not a replicated method call"
    # paramstore proposes through one replicated method taking one sealed command
    if len(value[1]) != 1 or type(value[1][0]) is not tuple or len(value[1][0]) != 2 or type(value[1][0][0]) is not int:
        return "command is not a sealed paramstore command"
    crc, data = value[1][0]
    try:
        ok = content_crc(data) == crc
    except TypeError as e:
        return str(e)
    if not ok:
        return "command content fails its CRC32 (flipped bytes)"
    return None


def _check_meta(meta: Path, last_term: int) -> None:
    """pysyncobj keeps term, vote and commit index here and silently starts
    from nothing (forgetting its vote) when it cannot read it."""
    if not meta.exists():
        if last_term > 0:
            raise _Broken(f"{meta} is missing but the journal has entries of term {last_term}")
        return
    try:
        value = plain_loads(meta.read_bytes())
    except Exception as e:
        raise _Broken(f"{meta} does not decode ({type(e).__name__}: {e})") from None
    if type(value) is not dict:
        raise _Broken(f"{meta} does not hold pysyncobj's metadata")
    term, vote, commit = value.get("currentTerm", 0), value.get("votedForNodeId"), value.get("raftCommitIndex", 1)
    if type(term) is not int or type(commit) is not int or not (vote is None or type(vote) is str):
        raise _Broken(f"{meta} does not hold pysyncobj's metadata")
