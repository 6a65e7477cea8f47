"""What a table reports about itself: the replicated digest and `info`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .admission import CountMinSketch
from .engine import RowStore
from .records import Meta


def digest(meta: Meta, store: RowStore, sketch: CountMinSketch | None) -> str:
    """sha256 over everything replicated: scalars, every record in ID order,
    admission counters. The caller holds the table open for reading."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                meta.name,
                meta.spec.to_json(),
                meta.version,
                meta.step,
                meta.rows,
                meta.admitted,
                meta.refused,
                meta.evicted,
            ],
            sort_keys=True,
        ).encode()
    )
    for keys, recs in store.iter_records():
        h.update(keys.astype(">u8").tobytes())
        h.update(recs.tobytes())
    if sketch is not None:
        h.update(sketch.counters.tobytes())
    return "sha256:" + h.hexdigest()


def info(meta: Meta, on_disk: int, in_memory: int, record_bytes: int) -> dict[str, Any]:
    return {
        "name": meta.name,
        "version": meta.version,
        "rows": meta.rows,
        "bytes_on_disk": on_disk,
        "bytes_in_memory": in_memory,
        "record_bytes": record_bytes,
        "step": meta.step,
        "admitted": meta.admitted,
        "refused": meta.refused,
        "evicted": meta.evicted,
        "config": meta.spec.to_json(),
    }
