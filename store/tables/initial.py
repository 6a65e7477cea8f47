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

import math

import numpy as np

from .spec import InitializerSpec

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_M1 = _U(0xBF58476D1CE4E5B9)
_M2 = _U(0x94D049BB133111EB)
_LN2 = 0.6931471805599453


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


def _horner(x: np.ndarray, coeffs: list[float]) -> np.ndarray:
    """coeffs[0] + x*(coeffs[1] + x*(...)), in place on one temporary."""
    acc = np.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        np.multiply(acc, x, out=acc)
        np.add(acc, c, out=acc)
    return acc


# atanh series: ln(m) = 2s(1 + s^2/3 + s^4/5 + ...), s = (m-1)/(m+1), |s| < 0.172
_LOG_COEFFS = [1.0 / k for k in range(1, 24, 2)]
# sin t = t(1 - t^2/3! + ...), cos t = 1 - t^2/2! + ..., for t in [0, pi/4]: terms to 1e-17
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(9)]
_COS_COEFFS = [(-1.0) ** k / math.factorial(2 * k) for k in range(10)]


def portable_log(x: np.ndarray) -> np.ndarray:
    """ln(x) for x > 0 in float64, from frexp (exact) and a series."""
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    low = m < 0.7071067811865476
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    acc = _horner(s * s, _LOG_COEFFS)
    np.multiply(acc, s, out=acc)
    np.multiply(acc, 2.0, out=acc)
    log: np.ndarray = e * _LN2 + acc
    return log


def portable_sincos_2pi(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of 2*pi*u for u in [0, 1): the octant from u*8 (exact), a
    reflection into [0, pi/4], then the series."""
    o8 = u * 8.0
    octant = np.floor(o8)
    f = o8 - octant
    o = octant.astype(np.int64) & 7
    odd = (o & 1).astype(bool)
    t = np.where(odd, 1.0 - f, f) * _QUARTER_PI
    t2 = t * t
    s = _horner(t2, _SIN_COEFFS)
    np.multiply(s, t, out=s)
    c = _horner(t2, _COS_COEFFS)
    swap = _SWAP[o]
    sin = np.where(swap, c, s)
    cos = np.where(swap, s, c)
    np.multiply(sin, _SIN_SIGN[o], out=sin)
    np.multiply(cos, _COS_SIGN[o], out=cos)
    return sin, cos


# octant k covers [k*pi/4, (k+1)*pi/4); odd octants were reflected (t -> pi/4 - t)
_SWAP = np.array([0, 1, 1, 0, 0, 1, 1, 0], dtype=bool)
_SIN_SIGN = np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.float64)
_COS_SIGN = np.array([1, 1, -1, -1, -1, -1, 1, 1], dtype=np.float64)
_QUARTER_PI = 0.7853981633974483


def initial_rows(init: InitializerSpec, keys: np.ndarray, dim: int) -> np.ndarray:
    """float32 (len(keys), dim); keys are the table's IDs as uint64."""
    n = len(keys)
    if init.type == "zeros" or n == 0:
        return np.zeros((n, dim), dtype=np.float32)
    if init.type == "uniform":
        u = uniform01(element_hashes(init.seed, keys, dim, 0))
        return ((u * 2.0 - 1.0) * init.bound).astype(np.float32)
    # normal: Box-Muller gives columns 2j and 2j+1 from one pair of uniforms;
    # u1 in (0, 1] so the log is finite
    pairs = (dim + 1) // 2
    u1 = 1.0 - uniform01(element_hashes(init.seed, keys, pairs, 1))
    u2 = uniform01(element_hashes(init.seed, keys, pairs, 2))
    radius = np.sqrt(-2.0 * portable_log(u1))
    np.multiply(radius, init.std, out=radius)
    sin, cos = portable_sincos_2pi(u2)
    out = np.empty((n, 2 * pairs), dtype=np.float32)
    out[:, 0::2] = radius * cos
    out[:, 1::2] = radius * sin
    return np.ascontiguousarray(out[:, :dim]) if dim % 2 else out
