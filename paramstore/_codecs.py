"""Wire dtypes: narrow float tensors for the network and widen them back
(docs/api.md, "Wire dtypes"). Pure numpy: the SDK and the server (api/) share
these functions, so both sides of a connection round the same way.

- float16: numpy's own conversion (round to nearest even; beyond 65504 is inf).
- bfloat16: the top 16 bits of the float32, rounded to nearest even (as torch);
  NaN stays a quiet NaN. Sent as little-endian uint16 (safetensors `BF16`).
- int8: symmetric per row. A tensor of shape (d0, d1, ...) has d0 rows of
  d1 x ... values (a scalar or a vector is one row); row r is sent as
  int8 q = rint(x / s_r) in [-127, 127] with the float32 scale
  s_r = max|x_r| / 127 (0 for an all-zero row), and read as q * s_r:
  |x - q * s_r| <= s_r / 2.
"""

from __future__ import annotations

import numpy as np

WIRE_DTYPES = ("float16", "bfloat16", "int8")
NARROW_FLOATS = ("float16", "bfloat16")  # sent as one array, no scales
CHUNK = 1 << 20  # int8 quantization works on blocks of about this many values


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits (uint16, same shape), round to nearest even."""
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(f32)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype("<u2")


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (np.asarray(bits, dtype="<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def rows_of(shape: tuple[int, ...]) -> int:
    """How many int8 scales a tensor of `shape` has."""
    return shape[0] if len(shape) >= 2 else 1


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, values per row) of the int8 view of `shape`."""
    cols = 1
    for d in shape[1:] if len(shape) >= 2 else shape:
        cols *= d
    return rows_of(shape), cols


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, same shape; float32 scales, one per row). Non-finite
    values cannot be carried: ValueError. Computed in float64, in blocks of
    about CHUNK values (bounded temporaries for large tensors)."""
    x = np.asarray(values)
    rows, cols = _matrix(x.shape)
    flat = x.reshape(rows, cols)
    amax = np.maximum(flat.max(axis=1), -flat.min(axis=1)) if cols else np.zeros(rows)
    if not np.isfinite(amax).all():
        raise ValueError("int8 cannot carry NaN or Inf")
    with np.errstate(over="ignore"):
        scales = (amax.astype(np.float64) / 127.0).astype(np.float32)
    if not np.isfinite(scales).all():
        raise ValueError("int8 scales would overflow float32")
    safe = np.where(scales > 0, scales, 1).astype(np.float64)
    q = np.empty((rows, cols), np.int8)
    if cols >= CHUNK:
        for r in range(rows):
            for c in range(0, cols, CHUNK):
                q[r, c : c + CHUNK] = _round(flat[r, c : c + CHUNK], safe[r])
    else:
        step = max(1, CHUNK // max(cols, 1))
        for r in range(0, rows, step):
            q[r : r + step] = _round(flat[r : r + step], safe[r : r + step, None])
    return q.reshape(x.shape), scales


def _round(x: np.ndarray, scale: np.ndarray | np.float64) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float64) / scale), -127, 127).astype(np.int8)


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of int8 `q` (any shape) with one scale per row."""
    rows, cols = _matrix(q.shape)
    s = np.asarray(scales, dtype=np.float32).reshape(rows, 1)
    return (q.reshape(rows, cols).astype(np.float32) * s).reshape(q.shape)


def narrow(values: np.ndarray, wire_dtype: str) -> np.ndarray:
    """float16 array, or bfloat16 bits (uint16), of `values`."""
    if wire_dtype == "float16":
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as numpy converts
            return np.ascontiguousarray(values, dtype="<f2")
    if wire_dtype == "bfloat16":
        return to_bfloat16(values)
    raise ValueError(f"{wire_dtype!r} is not one of {', '.join(NARROW_FLOATS)}")


def widen(data: np.ndarray, wire_dtype: str) -> np.ndarray:
    """float32 of a float16 array or bfloat16 bits."""
    if wire_dtype == "float16":
        return np.asarray(data, dtype="<f2").astype(np.float32)
    if wire_dtype == "bfloat16":
        return from_bfloat16(data)
    raise ValueError(f"{wire_dtype!r} is not one of {', '.join(NARROW_FLOATS)}")
