"""Bodies of the table endpoints: IDs and gradient rows in, rows out.

In: safetensors (`ids`, and `grads` for a push), `application/x-npy` (the IDs
of a lookup), or JSON `{"ids": [...], "grads": [[...], ...]}` for small
requests. Out (by `Accept`): safetensors `{"rows"}`, npy, or JSON.
Nothing is unpickled; dtypes are checked before any array is built.
"""

from __future__ import annotations

import io
import json
from typing import Any, cast

import numpy as np

from paramstore._wire import safetensors_file
from store.errors import InvalidRequest, Unprocessable, echo
from store.tables import rowdtype
from store.tables.ids import ids_from_json

from .errors import NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from .wire import read_npy_header

SAFETENSORS = "application/x-safetensors"
NPY = "application/x-npy"
JSON = "application/json"
ROW_TYPES = (SAFETENSORS, NPY, JSON)
JSON_MAX_VALUES = 1 << 20  # ids + grad values in one JSON body

_ST_INT: dict[str, np.dtype[Any]] = {
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
}
_ST_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_ST_OF_STORAGE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _safetensors(body: Any) -> dict[str, dict[str, Any]]:
    import safetensors

    try:
        return dict(cast(list[tuple[str, dict[str, Any]]], safetensors.deserialize(bytes(body))))
    except Exception as e:  # SafetensorError and friends: the body is malformed
        raise InvalidRequest(f"body is not a valid safetensors file: {e}") from None


def _st_ids(spec: dict[str, Any]) -> np.ndarray:
    dt = _ST_INT.get(spec["dtype"])
    if dt is None:
        raise Unprocessable(f"ids: expected an integer tensor (I64 or U64), got {echo(spec['dtype'])}")
    if len(spec["shape"]) != 1:
        raise Unprocessable(f"ids: expected a 1-D tensor, got shape {spec['shape']}")
    return np.frombuffer(spec["data"], dtype=dt)


def _st_grads(spec: dict[str, Any]) -> np.ndarray:
    kind = _ST_FLOAT.get(spec["dtype"])
    if kind is None:
        raise Unprocessable(f"grads: expected a float tensor (F32, F16, BF16), got {echo(spec['dtype'])}")
    if len(spec["shape"]) != 2:
        raise Unprocessable(f"grads: expected a 2-D tensor (one row per ID), got shape {spec['shape']}")
    if kind == "bfloat16":
        raw = np.frombuffer(spec["data"], dtype="<u2").reshape(spec["shape"])
        return rowdtype.decode(raw, "bfloat16")
    return np.frombuffer(spec["data"], dtype=kind).reshape(spec["shape"])


def _npy(body: Any) -> np.ndarray:
    view = memoryview(body)
    shape, fortran, dt, offset = read_npy_header(view, "iuf")
    want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(view) - offset != want:
        raise Unprocessable(f".npy data has {len(view) - offset} bytes, dtype {dt} and shape {list(shape)} need {want}")
    arr = np.frombuffer(view[offset:], dtype=dt)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _json(body: Any) -> dict[str, Any]:
    if len(body) > JSON_MAX_VALUES * 24:
        raise PayloadTooLarge(f"JSON table bodies are limited to about {JSON_MAX_VALUES} values; use {SAFETENSORS}")
    try:
        doc = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest('JSON body must be an object {"ids": [...]}')
    return doc


def _json_ids(doc: dict[str, Any]) -> np.ndarray:
    if "ids" not in doc:
        raise InvalidRequest('JSON body needs "ids"')
    return ids_from_json(doc["ids"])


def decode_lookup(content_type: str | None, body: Any) -> np.ndarray:
    """The IDs of a lookup (validated against the table later)."""
    kind = media_type(content_type)
    if kind == SAFETENSORS:
        parts = _safetensors(body)
        if set(parts) != {"ids"}:
            raise Unprocessable(f"lookup body must hold exactly 'ids', got {echo(sorted(parts))}")
        return _st_ids(parts["ids"])
    if kind == NPY:
        ids = _npy(body)
        if ids.dtype.kind == "f":
            raise Unprocessable(f"ids: expected integer IDs (int64 or uint64), got {ids.dtype}")
        return ids
    if kind == JSON:
        doc = _json(body)
        unknown = set(doc) - {"ids"}
        if unknown:
            raise InvalidRequest(f"lookup body: unknown field {echo(sorted(unknown)[0])}")
        return _json_ids(doc)
    raise UnsupportedMediaType(f"lookup takes {SAFETENSORS}, {NPY} or {JSON}")


def decode_push(content_type: str | None, body: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids, grads as float32 or float16/float64 as sent) of a push."""
    kind = media_type(content_type)
    if kind == SAFETENSORS:
        parts = _safetensors(body)
        if set(parts) != {"ids", "grads"}:
            raise Unprocessable(f"push body must hold exactly 'ids' and 'grads', got {echo(sorted(parts))}")
        return _st_ids(parts["ids"]), _st_grads(parts["grads"])
    if kind == JSON:
        doc = _json(body)
        unknown = set(doc) - {"ids", "grads"}
        if unknown or "grads" not in doc:
            raise InvalidRequest('push body must be {"ids": [...], "grads": [[...], ...]}')
        ids = _json_ids(doc)
        grads = doc["grads"]
        if not isinstance(grads, list) or not all(isinstance(r, list) for r in grads):
            raise Unprocessable("grads: expected a list of rows (lists of numbers)")
        widths = {len(r) for r in grads}
        if len(widths) > 1:
            raise Unprocessable("grads: rows have different lengths")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in grads for v in r):
            raise Unprocessable("grads: expected numbers")
        arr = np.array(grads, dtype=np.float64).reshape(len(grads), widths.pop() if widths else 0)
        with np.errstate(over="ignore"):
            return ids, arr.astype(np.float32)
    raise UnsupportedMediaType(f"push takes {SAFETENSORS} or {JSON}")


def negotiate(accept: str | None) -> str:
    """The best of safetensors (default), npy and JSON for an Accept header."""
    if not accept:
        return SAFETENSORS
    best, best_q = None, 0.0
    for part in accept.split(","):
        kind, *params = (b.strip() for b in part.split(";"))
        kind = kind.lower()
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        candidate = kind if kind in ROW_TYPES else SAFETENSORS if kind in ("*/*", "application/*") else None
        if candidate is not None and q > best_q:
            best, best_q = candidate, q
    if best is None:
        raise NotAcceptable(f"rows are served as {', '.join(ROW_TYPES)}")
    return best


def encode_rows(kind: str, rows: np.ndarray, dtype: str, metadata: dict[str, str]) -> bytes:
    """Rows (storage dtype; bfloat16 as uint16 bits) in the negotiated format."""
    rows = np.ascontiguousarray(rows)
    if kind == SAFETENSORS:
        return safetensors_file({"rows": (_ST_OF_STORAGE[dtype], rows)}, metadata)
    if kind == NPY:
        out = io.BytesIO()
        # numpy has no bfloat16: such rows go out as the float32 values they hold
        np.save(out, rowdtype.decode(rows, dtype) if dtype == "bfloat16" else rows, allow_pickle=False)
        return out.getvalue()
    return json.dumps({"rows": rowdtype.decode(rows, dtype).tolist(), **metadata}).encode()
