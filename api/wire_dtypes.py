"""Compressed reads (docs/api.md, "Wire dtypes"): `X-Wire-Dtype: float16 |
bfloat16 | int8` serves a float tensor (a single GET, a batch pull, table
rows) narrowed on the way out; the stored value never changes. Compressed
pushes are api/grad_widen.py.

Conversions of large arrays run in a worker thread, never on the event loop.
The codecs themselves are paramstore/_codecs.py, shared with the SDK.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
from starlette.responses import Response

from paramstore._codecs import WIRE_DTYPES, narrow, quantize_int8, rows_of
from paramstore._wire import safetensors_head
from store import dtypes
from store.errors import Unprocessable

from . import wire
from .errors import NotAcceptable

IN_THREAD_BYTES = 1 << 20  # conversions of arrays this large leave the event loop
_ST_CODE = {"float16": "F16", "bfloat16": "BF16", "int8": "I8", "float32": "F32"}
ST_FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
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
    head = safetensors_head(((key, code, arr.shape, arr.nbytes) for key, (code, arr) in tensors.items()), metadata)
    return [head, *(wire.raw_view(a) for _, a in tensors.values())]


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
