"""Initial rows computed from (table seed, ID): the value of every row that was
never stored, identical in every process, on every machine, after every restart.

Each element (id, column) gets a 64-bit counter-based hash (splitmix64 over
seed, ID and column), vectorised over the batch. Uniforms use its top bits;
normals use Box-Muller with a log, sin and cos built from +, -, *, / and sqrt
only (IEEE correctly rounded everywhere), evaluated in float64 and rounded to
float32 once: numpy's own transcendental functions may differ in the last
ulp between CPU builds (SIMD dispatch), which would make replicas diverge.
"""
from __future__ import annotations

import numpy as np

from .spec import InitializerSpec

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_LN2 = 0.6931471805599453
_HALF_PI = 1.5707963267948966


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of x + golden ratio (uint64, wraps)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U(30))) * _M1
    z = (z ^ (z >> _U(27))) * _M2
    return z ^ (z >> _U(31))


def element_hashes(seed: int, keys: np.ndarray, dim: int, stream: int) -> np.ndarray:
    """(n, dim) uint64 hashes of (seed, key, column, stream)."""
    with np.errstate(over="ignore"):
        base = splitmix64(splitmix64(np.asarray(keys, dtype=_U) ^ _U(seed)) + _U(stream))
        cols = splitmix64(np.arange(dim, dtype=_U) + _U(seed))
        return splitmix64(base[:, None] ^ cols[None, :])


def uniform01(h: np.ndarray) -> np.ndarray:
    """[0, 1) float64 from the top 53 bits."""
    return (h >> _U(11)).astype(np.float64) * (1.0 / (1 << 53))


def portable_log(x: np.ndarray) -> np.ndarray:
    """ln(x) for x > 0, float64, from frexp and an atanh series (|s| < 0.172)."""
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    low = m < 0.7071067811865476
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = np.full_like(s, 1.0 / 23.0)
    for k in range(21, 0, -2):
        acc = acc * s2 + 1.0 / k
    return e * _LN2 + 2.0 * s * acc


def _sin_cos_quarter(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of t in [0, pi/2) by Taylor series to degree 23."""
    t2 = t * t
    s = np.full_like(t, 1.0)
    c = np.full_like(t, 1.0)
    for k in range(23, 1, -2):  # sin: 1 - t2/(2*3) * (1 - t2/(4*5) * ...)
        s = 1.0 - s * t2 / float(k * (k - 1))
    for k in range(22, 0, -2):
        c = 1.0 - c * t2 / float(k * (k - 1))
    return s * t, c


def portable_cos_2pi(u: np.ndarray) -> np.ndarray:
    """cos(2*pi*u) for u in [0, 1): quadrant from u*4 (exact), then a series."""
    q4 = u * 4.0
    q = np.floor(q4)
    t = (q4 - q) * _HALF_PI
    s, c = _sin_cos_quarter(t)
    qi = q.astype(np.int64) & 3
    return np.select([qi == 0, qi == 1, qi == 2], [c, -s, -c], s)


def initial_rows(init: InitializerSpec, keys: np.ndarray, dim: int) -> np.ndarray:
    """float32 (len(keys), dim); keys are the table's IDs as uint64."""
    n = len(keys)
    if init.type == "zeros" or n == 0:
        return np.zeros((n, dim), dtype=np.float32)
    if init.type == "uniform":
        u = uniform01(element_hashes(init.seed, keys, dim, 0))
        return ((u * 2.0 - 1.0) * init.bound).astype(np.float32)
    # normal: Box-Muller; u1 in (0, 1] so the log is finite
    u1 = 1.0 - uniform01(element_hashes(init.seed, keys, dim, 1))
    u2 = uniform01(element_hashes(init.seed, keys, dim, 2))
    radius = np.sqrt(-2.0 * portable_log(u1))
    return (radius * portable_cos_2pi(u2) * init.std).astype(np.float32)
