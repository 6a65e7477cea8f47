"""Payload names: the hash of a payload's bytes, naming its algorithm.

    "b3-<64 hex>"  BLAKE3: payloads named by this version on (`limits.payload_ids`
                   = "b3", the default): 2.6x cheaper than SHA-256 per byte here,
                   paid by every replica on every large push (bench/hashes.py)
    "<64 hex>"     SHA-256: payloads named by earlier versions, and by this one
                   with `payload_ids = "sha256"` (while replicas of earlier
                   versions, which know only this form, are still in the cluster)

Both are read everywhere: logs, snapshots and data dirs of earlier versions
keep their SHA-256 names, and a payload is checked against the algorithm its
name gives. A payload id is a file name too: only these two forms are valid.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import blake3

from .buffers import Bytes, as_buffer

B3 = "b3"
SHA256 = "sha256"
KINDS = (B3, SHA256)
_PREFIX = {B3: "b3-", SHA256: ""}
_HEX = frozenset("0123456789abcdef")

_new_ids = B3  # the algorithm new payloads are named with (choose(), at start-up)


class Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...
    def hexdigest(self) -> str: ...


def choose(kind: str) -> None:
    """Name new payloads with `kind` from now on (store/node.py, from `limits.payload_ids`)."""
    global _new_ids
    if kind not in KINDS:
        raise ValueError(f"payload ids: {kind!r} is not one of {', '.join(KINDS)}")
    _new_ids = kind


def new_kind() -> str:
    return _new_ids


def kind_of(payload_id: str) -> str | None:
    """The algorithm a payload id names (None: not a valid id)."""
    kind = B3 if payload_id.startswith(_PREFIX[B3]) else SHA256
    hexed = payload_id[len(_PREFIX[kind]) :]
    return kind if len(hexed) == 64 and _HEX.issuperset(hexed) else None


def hasher(kind: str | None = None) -> Hasher:
    """A hasher for ids of `kind` (default: the kind new payloads get)."""
    kind = kind or _new_ids
    h: Hasher = blake3.blake3() if kind == B3 else hashlib.sha256()
    return h


def name(kind: str, h: Hasher) -> str:
    """The id of the bytes fed to `h` (from `hasher(kind)`)."""
    return _PREFIX[kind] + h.hexdigest()


def id_of(data: Bytes, kind: str | None = None) -> str:
    kind = kind or _new_ids
    h = hasher(kind)
    h.update(as_buffer(data))
    return name(kind, h)
