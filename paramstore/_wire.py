"""The data-path encodings the client speaks: raw little-endian bytes with
`X-Dtype` / `X-Shape`, and safetensors for many tensors (docs/api.md)."""

from __future__ import annotations

import json
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
