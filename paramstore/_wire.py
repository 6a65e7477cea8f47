"""The data-path encodings the client speaks: raw little-endian bytes with
`X-Dtype` / `X-Shape`, and safetensors for many tensors (docs/api.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

OCTET = "application/octet-stream"
SAFETENSORS = "application/x-safetensors"


def le_contiguous(value: Any) -> np.ndarray:
    """`value` as a C-contiguous little-endian array; no copy if it already is one."""
    arr = np.asarray(value)
    # Not np.ascontiguousarray: it turns a 0-d array (a scalar tensor) into shape (1,).
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")


def tensor_request(value: Any) -> tuple[list[memoryview], dict[str, str]]:
    """The body (one zero-copy chunk; httpx treats a bare memoryview as an
    iterable of ints) and headers of a raw tensor upload."""
    arr = le_contiguous(value)
    view = arr.reshape(-1).data.cast("B")
    headers = {
        "Content-Type": OCTET,
        "Content-Length": str(view.nbytes),
        "X-Dtype": arr.dtype.name,
        "X-Shape": ",".join(str(d) for d in arr.shape),
    }
    return [view], headers


def safetensors_metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: its 8-byte header length and
    JSON header are the format's documented framing."""
    n = int.from_bytes(body[:8], "little")
    meta: dict[str, str] = json.loads(body[8 : 8 + n]).get("__metadata__", {})
    return meta


def array_from(r: httpx.Response) -> np.ndarray:
    """A read-only view of a raw tensor response body."""
    text = r.headers["X-Shape"].strip()
    shape = tuple(int(d) for d in text.split(",") if d.strip()) if text else ()
    dtype = np.dtype(r.headers["X-Dtype"]).newbyteorder("<")
    return np.frombuffer(r.content, dtype=dtype).reshape(shape)


def version_of(r: httpx.Response) -> int:
    if "X-Version" in r.headers:
        return int(r.headers["X-Version"])
    return int(r.json()["version"])


_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "U64": "<u8", "I32": "<i4", "I8": "i1"}
ST_NAMES = {np.dtype(v).str: k for k, v in _ST_DTYPES.items()}


def safetensors_body(arrays: dict[str, np.ndarray]) -> bytes:
    """A safetensors file of little-endian arrays."""
    entries = {}
    for name, value in arrays.items():
        arr = le_contiguous(value)
        entries[name] = (ST_NAMES[arr.dtype.str], arr)
    return safetensors_file(entries)


def safetensors_head(
    entries: Iterable[tuple[str, str, Sequence[int], int]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The framing of a safetensors file whose tensors (name, dtype code,
    shape, byte count) follow in this order: u64 header length, then the JSON
    header padded to 8 bytes. The one writer of it, for the SDK and the server."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def safetensors_file(entries: dict[str, tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file of (dtype code, array) entries (BF16 as uint16 bits)."""
    arrays = {name: (code, le_contiguous(value)) for name, (code, value) in entries.items()}
    head = safetensors_head([(name, code, arr.shape, arr.nbytes) for name, (code, arr) in arrays.items()], metadata)
    return b"".join([head, *(arr.tobytes() for _, arr in arrays.values())])


def safetensors_entries(body: bytes) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a safetensors body as (dtype code, array); BF16 as its
    uint16 bits. Views of `body`, no copy."""
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n])
    view = memoryview(body)[8 + n :]
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        dt = "<u2" if spec["dtype"] == "BF16" else _ST_DTYPES[spec["dtype"]]
        out[name] = (spec["dtype"], np.frombuffer(view[start:end], dtype=dt).reshape(spec["shape"]))
    return out


def safetensors_array(body: bytes, name: str) -> np.ndarray:
    """One tensor of a safetensors body; bfloat16 comes back as float32 (exact)."""
    code, arr = safetensors_entries(body)[name]
    if code == "BF16":
        return (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return arr
