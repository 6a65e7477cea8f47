"""The dtypes and shapes a tensor may have, and validation of raw bytes against them."""
from __future__ import annotations

import numpy as np

from .errors import InvalidRequest, Unprocessable

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
FLOAT_DTYPES = {"float32", "float16", "float64"}
MAX_RANK = 8
MAX_ELEMENTS = 1 << 34


def dtype_of(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise Unprocessable(f"dtype {name!r} is not supported (supported: {', '.join(DTYPES)})") from None


def dtype_name(dt: np.dtype) -> str:
    for name, d in DTYPES.items():
        if np.dtype(dt).newbyteorder("<") == d:
            return name
    raise Unprocessable(f"dtype {dt} is not supported (supported: {', '.join(DTYPES)})")


def parse_shape(text: str) -> tuple[int, ...]:
    """'784,10' -> (784, 10); '' -> () for a scalar."""
    text = text.strip()
    if text in ("", "()", "[]"):
        return ()
    parts = text.strip("()[]").split(",")
    try:
        dims = tuple(int(p) for p in parts if p.strip() != "")
    except ValueError:
        raise InvalidRequest(f"shape {text!r} is not a comma-separated list of integers") from None
    return check_shape(dims)


def check_shape(dims) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        raise InvalidRequest(f"shape {dims!r} is not a list of integers") from None
    if len(dims) > MAX_RANK:
        raise Unprocessable(f"shape {dims} has rank {len(dims)} > {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise Unprocessable(f"shape {dims} has a negative dimension")
    n = 1
    for d in dims:
        n *= d
        if n > MAX_ELEMENTS:
            raise Unprocessable(f"shape {dims} has more than {MAX_ELEMENTS} elements")
    return dims


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return element_count(shape) * dtype_of(dtype).itemsize


def array_from_bytes(data, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view of `data` (no copy) with the declared dtype and shape."""
    want = expected_nbytes(dtype, shape)
    if len(data) != want:
        raise Unprocessable(
            f"body has {len(data)} bytes but dtype {dtype} and shape {list(shape)} need {want}")
    arr = np.frombuffer(data, dtype=dtype_of(dtype)).reshape(shape)
    arr.flags.writeable = False
    return arr


def all_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind != "f":
        return True
    return bool(np.isfinite(arr).all())
