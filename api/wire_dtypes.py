"""Compressed data path (docs/api.md, "Wire dtypes").

Reads: `X-Wire-Dtype: float16 | bfloat16 | int8` serves a float tensor (a
single GET, a batch pull, table rows) narrowed on the way out; the stored
value never changes. Pushes: a gradient sent narrower than its float tensor
(raw float16 / bfloat16, int8 with scales, or sparse (indices, values)) is
widened to the tensor's dtype here, before it is proposed, so the Raft log
and the optimizer see full-width gradients exactly as for a plain push.

Conversions of large arrays run in a worker thread, never on the event loop.
The codecs themselves are paramstore/_codecs.py, shared with the SDK.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import numpy as np
from starlette.responses import Response

from paramstore._codecs import NARROW_FLOATS, WIRE_DTYPES, dequantize_int8, narrow, quantize_int8, rows_of, widen
from store import dtypes
from store.buffers import Bytes
from store.errors import InvalidRequest, Unprocessable

from . import wire
from .errors import NotAcceptable

IN_THREAD_BYTES = 1 << 20  # conversions of arrays this large leave the event loop
_ST_CODE = {"float16": "F16", "bfloat16": "BF16", "int8": "I8", "float32": "F32"}
_ST_FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
SCALES = "/scales"  # a batch's int8 tensor N has its scales in N/scales ('/' is never in a name)


def requested(value: str | None) -> str | None:
    """The X-Wire-Dtype a read asks for; 406 listing the choices if unknown."""
    if value is None:
        return None
    v = value.strip().lower()
    if v not in WIRE_DTYPES:
        raise NotAcceptable(
            f"X-Wire-Dtype {value!r} is not one of {', '.join(WIRE_DTYPES)}", supported=list(WIRE_DTYPES)
        )
    return v


def check_float(name: str, dtype: str, wire_dtype: str) -> None:
    """422 (it depends on what is stored, as a dtype mismatch of a write does)."""
    if np.dtype(dtypes.dtype_of(dtype)).kind != "f":
        raise Unprocessable(f"tensor {name!r} is {dtype}; X-Wire-Dtype {wire_dtype} applies to float tensors only")


def media_type(wire_dtype: str) -> str:
    """A narrowed tensor is raw bytes; int8 is a safetensors file (values and scales)."""
    return wire.SAFETENSORS if wire_dtype == "int8" else wire.OCTET


def negotiate(accept: str | None, wire_dtype: str) -> str:
    return wire.negotiate(accept, (media_type(wire_dtype),))


async def off_loop(nbytes: int, fn: Any, *args: Any) -> Any:
    if nbytes > IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


# ---- reads ------------------------------------------------------------------------------
def safetensors_parts(tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None) -> list[Any]:
    """A safetensors file as its header followed by the arrays' own buffers
    (no copy): u64 header length, JSON header padded to 8 bytes, the data."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (code, arr) in tensors.items():
        header[key] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [len(head).to_bytes(8, "little") + head, *(wire.raw_view(a) for _, a in tensors.values())]


def narrowed(key: str, values: np.ndarray, wire_dtype: str) -> dict[str, tuple[str, np.ndarray]]:
    """The safetensors entries of one array in a wire dtype: `key`, and for
    int8 its scales under `key` + SCALES."""
    if wire_dtype == "int8":
        try:
            q, scales = quantize_int8(values)
        except ValueError as e:
            raise Unprocessable(f"{key!r}: {e}; pull it without X-Wire-Dtype int8") from None
        return {key: ("I8", q), key + SCALES: ("F32", scales)}
    return {key: (_ST_CODE[wire_dtype], narrow(values, wire_dtype))}


def tensor_parts(values: np.ndarray, wire_dtype: str) -> list[Any]:
    """The body of a single tensor's read: raw narrowed bytes, or for int8 a
    safetensors file with `values` and `scales`."""
    if wire_dtype == "int8":
        entries = narrowed("values", values, wire_dtype)
        return safetensors_parts({"values": entries["values"], "scales": entries["values" + SCALES]}, None)
    return [wire.raw_view(narrow(values, wire_dtype))]


async def tensor_response(
    name: str, values: np.ndarray, headers: dict[str, str], wire_dtype: str, kind: str, head_only: bool
) -> Response:
    check_float(name, headers["X-Dtype"], wire_dtype)
    if head_only:  # the length without converting: placeholders of the right shapes (never written)
        if wire_dtype == "int8":
            stand_in: dict[str, tuple[str, np.ndarray]] = {
                "values": ("I8", np.empty(values.shape, np.int8)),
                "scales": ("F32", np.empty(rows_of(values.shape), np.float32)),
            }
            total = sum(len(p) for p in safetensors_parts(stand_in, None))
        else:
            total = 2 * values.size
        hdrs = dict(headers, **{"X-Wire-Dtype": wire_dtype, "Content-Length": str(total)})
        return Response(b"", media_type=kind, headers=hdrs)
    parts = await off_loop(values.nbytes, tensor_parts, values, wire_dtype)
    hdrs = dict(headers, **{"X-Wire-Dtype": wire_dtype, "Content-Length": str(sum(len(p) for p in parts))})
    return wire.parts_response(parts, kind, hdrs)


def batch_body(arrays: dict[str, np.ndarray], wire_dtype: str, metadata: dict[str, str]) -> bytes:
    """A batch pull in a wire dtype: each tensor N narrowed (int8: N and N/scales)."""
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for key, values in arrays.items():
        tensors.update(narrowed(key, values, wire_dtype))
    return b"".join(safetensors_parts(tensors, {**metadata, "wire_dtype": wire_dtype}))


def rows_body(rows: np.ndarray, wire_dtype: str, metadata: dict[str, str]) -> bytes:
    """Table rows (float32, n x dim) in a wire dtype: `rows` (int8: and `scales`, one per row)."""
    entries = narrowed("rows", rows, wire_dtype)
    if wire_dtype == "int8":
        entries = {"rows": entries["rows"], "scales": entries["rows" + SCALES]}
    return b"".join(safetensors_parts(entries, metadata))


# ---- pushes -----------------------------------------------------------------------------
def narrow_raw(hd: Mapping[str, str], default: tuple[str, tuple[int, ...]] | None) -> str | None:
    """The wire dtype of a raw gradient body to widen: X-Dtype float16 or
    bfloat16 naming a narrower type than the float tensor's (None otherwise)."""
    sent = (hd.get("x-dtype") or "").strip().lower()
    if sent not in NARROW_FLOATS or wire.media_type(hd.get("content-type")) not in ("", wire.OCTET):
        return None
    if default is None:
        return None  # the tensor's dtype is unknown here: refused as a plain push would be
    target = default[0]
    if target == sent or np.dtype(dtypes.dtype_of(target)).kind != "f":
        return None  # same width (a plain push), or not a float tensor (refused as a mismatch)
    return sent


def is_compressed(hd: Mapping[str, str], default: tuple[str, tuple[int, ...]] | None) -> bool:
    return narrow_raw(hd, default) is not None or wire.media_type(hd.get("content-type")) == wire.SAFETENSORS


def decode_grad(
    name: str, hd: Mapping[str, str], body: Bytes, default: tuple[str, tuple[int, ...]] | None
) -> wire.WireTensor:
    """A compressed gradient body widened to the tensor's dtype and shape."""
    if default is None:
        raise Unprocessable(f"{name!r}: a compressed gradient needs the tensor's dtype, unknown on this replica")
    dtype, shape = default
    if np.dtype(dtypes.dtype_of(dtype)).kind != "f":
        raise Unprocessable(f"tensor {name!r} is {dtype}: compressed gradients apply to float tensors only")
    if wire.media_type(hd.get("content-type")) == wire.SAFETENSORS:
        dense = _from_safetensors(name, body, dtype, shape)
    else:
        wire_dtype = narrow_raw(hd, default)
        assert wire_dtype is not None
        shape_text = hd.get("x-shape")
        sent_shape = dtypes.parse_shape(shape_text) if shape_text is not None else shape
        if sent_shape != shape:
            raise Unprocessable(f"gradient is {list(sent_shape)} but tensor {name!r} is {list(shape)}")
        want = dtypes.element_count(shape) * 2
        if len(body) != want:
            raise Unprocessable(
                f"body has {len(body)} bytes but X-Dtype {wire_dtype} and shape {list(shape)} need {want}"
            )
        raw = np.frombuffer(body, dtype="<f2" if wire_dtype == "float16" else "<u2").reshape(shape)
        dense = widen(raw, wire_dtype)
    out = np.ascontiguousarray(dense, dtype=dtypes.dtype_of(dtype))
    return wire.WireTensor(dtype, shape, wire.raw_view(out))


def decode_batch_grads(body: Bytes, dtype_of: Callable[[str], str | None]) -> dict[str, wire.WireTensor]:
    """The gradients of a batch push: each tensor N as sent, or, for a float
    tensor (its dtype by `dtype_of`), N as F16 / BF16, or I8 with N/scales,
    widened to the tensor's dtype."""
    import safetensors

    try:
        parts = dict(safetensors.deserialize(bytes(body)))
    except Exception as e:  # SafetensorError and friends: the body is malformed
        raise InvalidRequest(f"body is not a valid safetensors file: {e}") from None
    out: dict[str, wire.WireTensor] = {}
    for key, spec in parts.items():
        if key.endswith(SCALES) and key[: -len(SCALES)] in parts:
            continue
        shape = dtypes.check_shape(spec["shape"])
        code = spec["dtype"]
        target = dtype_of(key) if code in ("F16", "BF16", "I8") else None
        if target is None or np.dtype(dtypes.dtype_of(target)).kind != "f" or _ST_FLOAT.get(code) == target:
            if code == "I8" and key + SCALES in parts:
                raise Unprocessable(f"{key!r}: int8 gradients apply to float tensors held by this replica")
            out[key] = wire.WireTensor(dtypes.from_safetensors(code, f"tensor {key!r}"), shape, spec["data"])
            continue
        if code == "I8":
            if key + SCALES not in parts:
                raise Unprocessable(f"{key!r}: int8 values need their scales in {key + SCALES!r}")
            dense = _int8(key, spec, parts[key + SCALES], shape)
        else:
            kind = _ST_FLOAT[code]
            dense = widen(np.frombuffer(spec["data"], dtype="<f2" if kind == "float16" else "<u2"), kind)
        arr = np.ascontiguousarray(dense.reshape(shape), dtype=dtypes.dtype_of(target))
        out[key] = wire.WireTensor(target, shape, wire.raw_view(arr))
    return out


def _from_safetensors(name: str, body: Bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """int8 `values` with their `scales`, or sparse flat `indices` with `values`."""
    import safetensors

    try:
        parts = dict(safetensors.deserialize(bytes(body)))
    except Exception as e:  # SafetensorError and friends: the body is malformed
        raise Unprocessable(f"body is not a valid safetensors file: {e}") from None
    keys = set(parts)
    values = parts.get("values")
    if keys == {"values", "scales"} or (keys == {"values"} and values is not None and values["dtype"] == "I8"):
        if "scales" not in parts:
            raise Unprocessable("int8 values need their 'scales' (float32, one per row) in the same body")
        return _int8(name, parts["values"], parts["scales"], shape)
    if keys == {"indices", "values"}:
        return _sparse(name, parts["indices"], parts["values"], dtype, shape)
    raise Unprocessable(
        f"a safetensors gradient holds 'values' and 'scales' (int8) or 'indices' and 'values' (sparse); "
        f"got {sorted(keys)}"
    )


def _int8(name: str, values: dict[str, Any], scales: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    if values["dtype"] != "I8" or tuple(values["shape"]) != shape:
        raise Unprocessable(
            f"values: expected I8 of shape {list(shape)} for {name!r}, got {values['dtype']} {values['shape']}"
        )
    rows = rows_of(shape)
    if scales["dtype"] != "F32" or tuple(scales["shape"]) != (rows,):
        raise Unprocessable(
            f"scales: expected F32 of shape [{rows}] (one per row), got {scales['dtype']} {scales['shape']}"
        )
    s = np.frombuffer(scales["data"], dtype="<f4")
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise Unprocessable("scales must be finite and >= 0")
    q = np.frombuffer(values["data"], dtype=np.int8).reshape(shape)
    return dequantize_int8(q, s)


def _sparse(
    name: str, indices: dict[str, Any], values: dict[str, Any], dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    if indices["dtype"] != "I64" or len(indices["shape"]) != 1:
        raise Unprocessable(f"indices: expected a 1-D I64 tensor, got {indices['dtype']} {indices['shape']}")
    k = indices["shape"][0]
    kind = _ST_FLOAT.get(values["dtype"])
    if kind is None or list(values["shape"]) != [k]:
        raise Unprocessable(
            f"values: expected {k} floats (F32, F16, BF16 or F64), got {values['dtype']} {values['shape']}"
        )
    idx = np.frombuffer(indices["data"], dtype="<i8")
    size = dtypes.element_count(shape)
    if k and (idx.min() < 0 or idx.max() >= size):
        raise Unprocessable(f"indices must be flat positions in [0, {size}) of {name!r}")
    raw = values["data"]
    vals = widen(np.frombuffer(raw, dtype="<u2"), "bfloat16") if kind == "bfloat16" else np.frombuffer(raw, dtype=kind)
    dense = np.zeros(size, dtype=dtypes.dtype_of(dtype))
    np.add.at(dense, idx, vals.astype(dense.dtype))  # duplicates are summed
    return dense.reshape(shape)
