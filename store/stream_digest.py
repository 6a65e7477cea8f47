"""The digest a signed data-path reply's trailer MAC covers (`snapshot`,
`tables`: store/datapath.py, store/peer_auth.py).

Keyed BLAKE3 ("b3") under a key derived from the cluster secret: 2.6-3.6x
hashlib's SHA-256 on one core here (bench/hashes.py, docs/benchmarks.md),
which both the sender and the receiver pay on every byte. The receiver asks
for it (`digest` in its request header) and the sender says in its reply's
head which one it used, so each side keeps talking to replicas of earlier
versions, which know only SHA-256 (a header field they ignore, a head without
the field). The digest string names its algorithm ("b3:<hex>"; SHA-256's is
bare hex, as before), and the trailer MAC signs that string, so a changed
`digest` field in the head fails the MAC like any altered byte. The field
sits outside the header MAC (older servers would refuse it inside); someone
who strips it only gets the SHA-256 form, which is as safe, only slower.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import blake3

from .content_id import B3, SHA256  # keyed BLAKE3; SHA-256: replicas before B3 (no `digest` field)

KNOWN = (B3, SHA256)
_CONTEXT = "paramstore 2026 data-path stream digest"


def stream_key(datapath_key: bytes) -> bytes:
    """The keyed-BLAKE3 key, derived from the data path's MAC key (store/peer_auth.py)."""
    return blake3.blake3(datapath_key, derive_key_context=_CONTEXT).digest()


def requested(header: Mapping[str, Any]) -> str:
    """The algorithm a server uses for a request's reply: B3 if asked for."""
    return B3 if header.get("digest") == B3 else SHA256


def announced(reply: Mapping[str, Any]) -> str | None:
    """The algorithm a reply's head says its sender used (None: unknown)."""
    alg = reply.get("digest", SHA256)
    return alg if alg in KNOWN else None


class StreamDigest:
    """The digest of a stream under `alg`, and its length (bytes fed)."""

    def __init__(self, alg: str, key: bytes) -> None:
        self.alg = alg
        self._h: Any = blake3.blake3(key=key) if alg == B3 else hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        """What the trailer MAC signs: "b3:<hex>", or SHA-256's bare hex (the old form)."""
        hexed: str = self._h.hexdigest()
        return hexed if self.alg == SHA256 else f"{self.alg}:{hexed}"
