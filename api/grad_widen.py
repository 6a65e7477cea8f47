"""Compressed gradient pushes (docs/api.md, "Wire dtypes"): a gradient sent
narrower than its float tensor (raw float16 / bfloat16, int8 with scales, or
sparse (indices, values)) is widened to the tensor's dtype here, before it is
proposed, so the Raft log and the optimizer see full-width gradients exactly
as for a plain push."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from paramstore._codecs import NARROW_FLOATS, dequantize_int8, rows_of, widen
from store import dtypes
from store.buffers import Bytes
from store.errors import InvalidRequest, Unprocessable

from . import wire
from .wire_dtypes import SCALES, ST_FLOAT


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
        if target is None or np.dtype(dtypes.dtype_of(target)).kind != "f" or ST_FLOAT.get(code) == target:
            if code == "I8" and key + SCALES in parts:
                raise Unprocessable(f"{key!r}: int8 gradients apply to float tensors held by this replica")
            out[key] = wire.WireTensor(dtypes.from_safetensors(code, f"tensor {key!r}"), shape, spec["data"])
            continue
        if code == "I8":
            if key + SCALES not in parts:
                raise Unprocessable(f"{key!r}: int8 values need their scales in {key + SCALES!r}")
            dense = _int8(key, spec, parts[key + SCALES], shape)
        else:
            kind = ST_FLOAT[code]
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
    kind = ST_FLOAT.get(values["dtype"])
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
