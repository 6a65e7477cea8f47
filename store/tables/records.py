"""The on-disk layout of an embedding table: its replicated scalars (`Meta`,
under META_KEY), its packed row records and the outcome of one push."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import rowdtype
from .rowopt import state_width
from .spec import TableSpec, parse_spec

META_KEY = b"state"
VERSION_KEY = b"version"  # also in META_KEY; alone so a lookup reads 8 bytes, not JSON
SKETCH_PREFIX = b"sketch:"


@dataclass(frozen=True)
class Meta:
    """The replicated scalars of a table, committed with its rows."""

    name: str
    spec: TableSpec
    version: int = 0  # pushes applied
    step: int = 0  # optimizer step count (torch: one per parameter tensor)
    stamp: int = 0  # log stamp of the last applied push
    rows: int = 0  # rows stored
    admitted: int = 0  # rows created
    refused: int = 0  # gradient rows dropped by admission
    evicted: int = 0  # rows evicted
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "spec": self.spec.to_json(),
                "version": self.version,
                "step": self.step,
                "stamp": self.stamp,
                "rows": self.rows,
                "admitted": self.admitted,
                "refused": self.refused,
                "evicted": self.evicted,
                "extra": self.extra,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Meta:
        d = json.loads(raw)
        return cls(
            d["name"],
            parse_spec(d["spec"]),
            d["version"],
            d["step"],
            d["stamp"],
            d["rows"],
            d["admitted"],
            d["refused"],
            d["evicted"],
            d.get("extra", {}),
        )


@dataclass(frozen=True)
class PushResult:
    version: int
    rows: int  # distinct IDs updated
    created: int  # rows admitted by this push
    refused: int  # distinct IDs whose gradient admission dropped
    evicted: int
    duplicate: bool = False  # stamp already applied: nothing changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rows": self.rows,
            "created": self.created,
            "refused": self.refused,
            "evicted": self.evicted,
            "duplicate": self.duplicate,
        }


def record_dtype(spec: TableSpec) -> np.dtype:
    """Packed record: last update version, the row (storage dtype), float32 optimizer state."""
    return np.dtype(
        [
            ("v", "<u8"),
            ("row", rowdtype.STORAGE[spec.dtype], (spec.dim,)),
            ("state", "<f4", (state_width(spec.optimizer, spec.dim),)),
        ]
    )
