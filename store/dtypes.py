"""The dtypes and shapes a tensor may have, and validation of raw bytes against them."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidRequest, Unprocessable, echo

# The one table of the dtypes a tensor may have: name (X-Dtype, JSON, .npy),
# numpy dtype (little-endian, as stored) and safetensors code.
_TABLE: tuple[tuple[str, str, str], ...] = (
    ("float32", "<f4", "F32"),
    ("float16", "<f2", "F16"),
    ("float64", "<f8", "F64"),
    ("int32", "<i4", "I32"),
    ("int64", "<i8", "I64"),
)
DTYPES: dict[str, np.dtype] = {name: np.dtype(np_code) for name, np_code, _ in _TABLE}
FLOAT_DTYPES = {name for name, dt in DTYPES.items() if dt.kind == "f"}
SAFETENSORS: dict[str, str] = {name: st for name, _, st in _TABLE}  # name -> safetensors code
FROM_SAFETENSORS: dict[str, str] = {st: name for name, st in SAFETENSORS.items()}
MAX_RANK = 8
MAX_ELEMENTS = 1 << 34


def dtype_of(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise Unprocessable(f"dtype {echo(name)} is not supported (supported: {', '.join(DTYPES)})") from None


def dtype_name(dt: np.dtype) -> str:
    for name, d in DTYPES.items():
        if np.dtype(dt).newbyteorder("<") == d:
            return name
    raise Unprocessable(f"dtype {dt} is not supported (supported: {', '.join(DTYPES)})")


def from_safetensors(code: str, what: str) -> str:
    """The dtype name of a safetensors dtype code; Unprocessable if the store does not hold it."""
    try:
        return FROM_SAFETENSORS[code]
    except KeyError:
        raise Unprocessable(
            f"{what}: safetensors dtype {code} is not supported (supported: {', '.join(FROM_SAFETENSORS)})"
        ) from None


def parse_shape(text: str) -> tuple[int, ...]:
    """'784,10' -> (784, 10); '' -> () for a scalar."""
    text = text.strip()
    if text in ("", "()", "[]"):
        return ()
    parts = text.strip("()[]").split(",")
    try:
        dims = tuple(int(p) for p in parts if p.strip() != "")
    except ValueError:
        raise InvalidRequest(f"shape {echo(text)} is not a comma-separated list of integers") from None
    return check_shape(dims)


def check_shape(given: Any) -> tuple[int, ...]:
    # Integers only (2.0 is one, as in JSON Schema): int() would take 2.5 as 2, True as 1 and "3" as 3.
    try:
        if isinstance(given, (str, bytes)) or not all(_is_integer(d) for d in given):
            raise TypeError
        dims = tuple(int(d) for d in given)
    except TypeError:
        raise InvalidRequest(f"shape {echo(given)} is not a list of integers") from None
    if len(dims) > MAX_RANK:
        raise Unprocessable(f"shape {dims} has rank {len(dims)} > {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise Unprocessable(f"shape {dims} has a negative dimension")
    # Zero-size dimensions are skipped: numpy refuses (0, 2**62, 2**62) too,
    # whose other dimensions overflow its index type.
    n = 1
    for d in dims:
        n *= max(d, 1)
        if n > MAX_ELEMENTS:
            raise Unprocessable(f"shape {dims} has more than {MAX_ELEMENTS} elements (zero dimensions aside)")
    return dims


def _is_integer(d: Any) -> bool:
    if isinstance(d, float):
        return d.is_integer()
    return isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_))


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return element_count(shape) * dtype_of(dtype).itemsize


def array_from_bytes(data: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view of `data` (no copy) with the declared dtype and shape.
    The shape is checked again here, in the state machine: a command that got
    past the API's checks fails the same way on every replica (422), not in numpy."""
    shape = check_shape(shape)
    want = expected_nbytes(dtype, shape)
    if len(data) != want:
        raise Unprocessable(f"body has {len(data)} bytes but dtype {dtype} and shape {list(shape)} need {want}")
    arr = np.frombuffer(data, dtype=dtype_of(dtype)).reshape(shape)
    arr.flags.writeable = False
    return arr


def all_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind != "f":
        return True
    return bool(np.isfinite(arr).all())
