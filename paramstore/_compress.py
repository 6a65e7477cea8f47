"""The client's side of compressed pulls and pushes (docs/api.md, "Wire
dtypes"): decoding narrowed answers to float32, encoding narrowed, int8 and
top-k gradients, and the per-tensor residual of top-k's error feedback."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np

from ._codecs import NARROW_FLOATS, WIRE_DTYPES, dequantize_int8, narrow, quantize_int8, widen
from ._wire import (
    OCTET,
    SAFETENSORS,
    array_from,
    le_contiguous,
    safetensors_entries,
    safetensors_file,
    tensor_request,
)

SCALES = "/scales"  # a batch's int8 tensor N has its scales in N/scales
ST_CODE = {"float16": "F16", "bfloat16": "BF16"}


def wire_dtype_of(value: str | None) -> str | None:
    if value is not None and value not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype {value!r} is not one of {', '.join(WIRE_DTYPES)}")
    return value


def float32_of(code: str, arr: np.ndarray) -> np.ndarray:
    """A safetensors entry (F16 / BF16 bits / F32 / F64) as float32."""
    if code == "BF16":
        return widen(arr, "bfloat16")
    return np.asarray(arr, dtype=np.float32)


# ---- reads ------------------------------------------------------------------------------
def decode_tensor(r: httpx.Response) -> np.ndarray:
    """float32 value of a single-tensor answer to X-Wire-Dtype (a server that
    ignored the header sent the stored value)."""
    wire_dtype = r.headers.get("X-Wire-Dtype")
    if wire_dtype is None:
        return np.asarray(array_from(r), dtype=np.float32)
    text = r.headers["X-Shape"].strip()
    shape = tuple(int(d) for d in text.split(",") if d.strip()) if text else ()
    if wire_dtype == "int8":
        parts = safetensors_entries(r.content)
        return dequantize_int8(parts["values"][1], parts["scales"][1]).reshape(shape)
    raw = np.frombuffer(r.content, dtype="<f2" if wire_dtype == "float16" else "<u2")
    return widen(raw, wire_dtype).reshape(shape)


def decode_batch(body: bytes, names: list[str]) -> dict[str, np.ndarray]:
    """float32 values of a batch pull in a wire dtype."""
    parts = safetensors_entries(body)
    out = {}
    for n in names:
        code, arr = parts[n]
        out[n] = dequantize_int8(arr, parts[n + SCALES][1]) if code == "I8" else float32_of(code, arr)
    return out


def decode_rows(body: bytes) -> np.ndarray:
    """float32 rows of a table lookup in a wire dtype."""
    parts = safetensors_entries(body)
    code, rows = parts["rows"]
    return dequantize_int8(rows, parts["scales"][1]) if code == "I8" else float32_of(code, rows)


# ---- pushes -----------------------------------------------------------------------------
def grad_body(grad: np.ndarray, wire_dtype: str) -> tuple[bytes | list[memoryview], dict[str, str], np.ndarray]:
    """(body, headers, what the server will apply) of a gradient in a wire dtype."""
    g = np.asarray(grad)
    if wire_dtype == "int8":
        q, scales = quantize_int8(g)
        body = safetensors_file({"values": ("I8", q), "scales": ("F32", scales)})
        return body, {"Content-Type": SAFETENSORS}, dequantize_int8(q, scales)
    narrowed = le_contiguous(narrow(g, wire_dtype))
    view = narrowed.reshape(-1).data.cast("B")
    headers = {
        "Content-Type": OCTET,
        "Content-Length": str(view.nbytes),
        "X-Dtype": wire_dtype,
        "X-Shape": ",".join(str(d) for d in g.shape),
    }
    return [view], headers, widen(narrowed, wire_dtype)


def batch_grads_body(grads: Mapping[str, Any], wire_dtype: str | None) -> bytes:
    """A batch push's safetensors body: each gradient as it is, or narrowed
    (int8: N and N/scales)."""
    if wire_dtype is None:
        from safetensors.numpy import save

        return save({name: le_contiguous(g) for name, g in grads.items()})
    entries: dict[str, tuple[str, np.ndarray]] = {}
    for name, g in grads.items():
        arr = le_contiguous(g)
        if wire_dtype == "int8":
            q, scales = quantize_int8(arr)
            entries[name], entries[name + SCALES] = ("I8", q), ("F32", scales)
        else:
            entries[name] = (ST_CODE[wire_dtype], narrow(arr, wire_dtype))
    return safetensors_file(entries)


def topk_fraction(compress: str) -> float:
    """0.01 for "topk:0.01"; ValueError for anything else or a fraction outside (0, 1]."""
    kind, _, arg = compress.partition(":")
    if kind != "topk":
        raise ValueError(f"compress {compress!r}: the one scheme is 'topk:<fraction>', e.g. 'topk:0.01'")
    try:
        fraction = float(arg)
    except ValueError:
        raise ValueError(f"compress {compress!r}: the fraction must be a number in (0, 1]") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"compress {compress!r}: the fraction must be in (0, 1], got {fraction}")
    return fraction


def topk_body(acc: np.ndarray, fraction: float, wire_dtype: str | None) -> tuple[bytes, np.ndarray]:
    """(sparse body, the dense gradient it amounts to) of the largest
    ceil(fraction * size) entries of `acc` by magnitude."""
    flat = acc.reshape(-1)
    k = min(flat.size, max(1, math.ceil(fraction * flat.size))) if flat.size else 0
    idx = top_indices(np.abs(flat), k)
    values = flat[idx]
    if wire_dtype in NARROW_FLOATS:
        sent_values = narrow(values, wire_dtype)
        code, applied = ST_CODE[wire_dtype], widen(sent_values, wire_dtype).astype(flat.dtype)
    elif wire_dtype is None:
        sent_values, applied = le_contiguous(values.astype(np.float32)), values.astype(np.float32).astype(flat.dtype)
        code = "F32"
    else:
        raise ValueError(f"top-k sends float16, bfloat16 or float32 values, not {wire_dtype}")
    body = safetensors_file({"indices": ("I64", idx.astype(np.int64)), "values": (code, sent_values)})
    dense = np.zeros_like(flat)
    dense[idx] = applied
    return body, dense.reshape(acc.shape)


Body = bytes | list[memoryview]


def top_indices(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the k largest of a 1-D array (exactly; ties either way).
    A selection over millions of values is slow (argpartition of 4 M: 300 ms),
    so, as Deep Gradient Compression does, a sample first gives a threshold
    that about 2k values pass; the exact top k is chosen among those."""
    n = magnitudes.size
    if k == 0:
        return np.zeros(0, np.int64)
    if n > 1 << 16 and 8 * k < n:
        sample = magnitudes[np.random.default_rng(n).integers(0, n, 1 << 14)]
        rank = int(len(sample) * (1 - 2 * k / n))
        threshold = np.partition(sample, rank)[rank]
        candidates = np.flatnonzero(magnitudes >= threshold)
        if candidates.size >= k:  # then the k largest are all among them
            chosen = np.argpartition(magnitudes[candidates], candidates.size - k)[candidates.size - k :]
            return np.sort(candidates[chosen])
    return np.sort(np.argpartition(magnitudes, n - k)[n - k :])


class Residuals:
    """Top-k's error feedback: per tensor, what was not sent yet (added to the
    next gradient of that tensor). Thread-safe; a failed push gives its
    residual back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, np.ndarray] = {}

    def take(self, name: str) -> np.ndarray | None:
        with self._lock:
            return self._by_name.pop(name, None)

    def give(self, name: str, residual: np.ndarray | None) -> None:
        if residual is None:
            return
        with self._lock:
            held = self._by_name.get(name)
            self._by_name[name] = residual if held is None or held.shape != residual.shape else held + residual

    def peek(self, name: str) -> np.ndarray | None:
        with self._lock:
            r = self._by_name.get(name)
            return None if r is None else r.copy()

    def forget(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)

    @contextmanager
    def grad_request(
        self, name: str, grad: Any, wire_dtype: str | None, compress: str | None
    ) -> Iterator[tuple[Body, dict[str, str]]]:
        """(body, headers) of a gradient push of `name`; with `compress` the
        top-k of grad + residual, the rest kept as the new residual once the
        block completes (a push that raises gives the old residual back)."""
        wire_dtype = wire_dtype_of(wire_dtype)
        if compress is None:
            if wire_dtype is None:
                yield tensor_request(grad)
            else:
                body, headers, _ = grad_body(grad, wire_dtype)
                yield body, headers
            return
        fraction = topk_fraction(compress)
        residual = self.take(name)
        try:
            acc = accumulate(grad, residual)
            body, applied = topk_body(acc, fraction, wire_dtype)
            yield body, {"Content-Type": SAFETENSORS}
        except BaseException:
            self.give(name, residual)
            raise
        self.give(name, acc - applied)


def accumulate(grad: Any, residual: np.ndarray | None) -> np.ndarray:
    g = np.asarray(grad)
    g = g.astype(np.float32) if g.dtype.kind != "f" or g.dtype.itemsize < 4 else g
    return g + residual if residual is not None and residual.shape == g.shape else g.copy()
