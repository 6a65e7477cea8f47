"""Row storage dtypes. Updates are computed in float32; rows are stored as
float32, float16 or bfloat16. numpy has no bfloat16, so it is kept as the
upper 16 bits of a float32 (uint16), rounded to nearest-even as torch does.
"""

from __future__ import annotations

import numpy as np

STORAGE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}


def itemsize(dtype: str) -> int:
    return STORAGE[dtype].itemsize


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage array (same shape)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow -> inf, refused by the caller
            return values.astype(np.float16)
    bits = values.view(np.uint32)
    # round to nearest even on the 16 bits dropped; NaN stays a quiet NaN
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded)
    return rounded.astype(np.uint16)


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """storage array -> float32 (exact: every stored value is a float32)."""
    if dtype == "float32":
        return np.asarray(stored, dtype=np.float32)
    if dtype == "float16":
        return stored.astype(np.float32)
    return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
