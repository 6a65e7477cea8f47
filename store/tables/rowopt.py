"""Row-wise optimizers for embedding tables: applied to the touched rows only,
in float32, with the optimizer state of each row kept beside the row.

Each rule follows its reference operation for operation (see the tests):
torch.optim.SGD / Adagrad / SparseAdam on a sparse gradient, FBGEMM's
EXACT_ROWWISE_ADAGRAD, and FTRL-Proximal (McMahan et al. 2013, Algorithm 1,
with TensorFlow's learning-rate power). Functions are pure: they return new
arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .spec import OptimizerSpec

F32 = np.float32
Rule = Callable[[OptimizerSpec, np.ndarray, np.ndarray, np.ndarray, int, float], tuple[np.ndarray, np.ndarray]]


def state_width(opt: OptimizerSpec, dim: int) -> int:
    """float32 values of optimizer state per row."""
    return {"sgd": 0, "adagrad": dim, "rowwise_adagrad": 1, "sparse_adam": 2 * dim, "ftrl": 2 * dim}[opt.type]


def initial_state(opt: OptimizerSpec, n: int, dim: int) -> np.ndarray:
    state = np.zeros((n, state_width(opt, dim)), dtype=F32)
    if opt.type in ("adagrad", "rowwise_adagrad"):
        state[:] = F32(opt["initial_accumulator_value"])
    elif opt.type == "ftrl":  # [z | n]: the accumulator n starts at initial_accumulator_value
        state[:, dim:] = F32(opt["initial_accumulator_value"])
    return state


def coalesce(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the gradients of duplicate keys, as torch's sparse `coalesce`:
    (sorted unique keys, summed float32 rows, occurrences per key). Rows of one
    key are added in the order they came, so every replica gets the same bits."""
    ukeys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if len(ukeys) == len(keys):
        order = np.argsort(keys, kind="stable")
        return ukeys, np.ascontiguousarray(grads[order], dtype=F32), counts
    summed = np.zeros((len(ukeys), grads.shape[1]), dtype=F32)
    np.add.at(summed, inverse, grads.astype(F32, copy=False))
    return ukeys, summed, counts


def _axpy(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """x + alpha * y rounded once with alpha rounded to float32, as torch's
    dense += sparse with `alpha`: the float32 product is exact in float64."""
    return (x.astype(np.float64) + y.astype(np.float64) * np.float64(F32(alpha))).astype(F32)


def _sgd(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, g: np.ndarray, step: int, lr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    return _axpy(rows, g, -(opt["lr"] * lr_scale)), state


def _adagrad(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, g: np.ndarray, step: int, lr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    clr = opt["lr"] * lr_scale / (1 + (step - 1) * opt["lr_decay"])
    acc = state + g * g
    std = np.sqrt(acc) + F32(opt["eps"])
    return _axpy(rows, g / std, -clr), acc


def _rowwise_adagrad(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, g: np.ndarray, step: int, lr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    wd = opt["weight_decay"]
    if wd != 0:  # FBGEMM's L2 weight decay: folded into the gradient
        g = g + rows * F32(wd)
    mean_sq = (g * g).sum(axis=1, keepdims=True, dtype=F32) / F32(g.shape[1])
    acc = state + mean_sq
    multiplier = F32(opt["lr"] * lr_scale) / (np.sqrt(acc) + F32(opt["eps"]))
    return rows - multiplier * g, acc


def _sparse_adam(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, g: np.ndarray, step: int, lr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    dim = rows.shape[1]
    beta1, beta2 = opt["betas"]
    m_old, v_old = state[:, :dim], state[:, dim:]
    m_upd = (g - m_old) * F32(1 - beta1)
    v_upd = (g * g - v_old) * F32(1 - beta2)
    m = m_old + m_upd
    v = v_old + v_upd
    numer = m_upd + m_old
    denom = np.sqrt(v_upd + v_old) + F32(opt["eps"])
    step_size = opt["lr"] * lr_scale * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return rows + F32(-step_size) * (numer / denom), np.concatenate([m, v], axis=1)


def _pow(x: np.ndarray, p: float) -> np.ndarray:
    if p == 0.5:
        return np.asarray(np.sqrt(x), dtype=F32)
    if p == 0.0:
        return np.ones_like(x)
    powered: np.ndarray = np.power(x.astype(np.float64), p).astype(F32)
    return powered


def _ftrl(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, g: np.ndarray, step: int, lr_scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per coordinate: n' = n + g^2; sigma = (n'^p - n^p) / alpha; z += g - sigma*w;
    w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + n'^p) / alpha + l2), p = -lr_power."""
    dim = rows.shape[1]
    alpha = F32(opt["lr"] * lr_scale)
    p = -opt["lr_power"]
    l1, l2, beta = F32(opt["l1"]), F32(opt["l2"]), F32(opt["beta"])
    z, n = state[:, :dim], state[:, dim:]
    n_new = n + g * g
    n_new_p = _pow(n_new, p)
    sigma = (n_new_p - _pow(n, p)) / alpha
    z = z + g - sigma * rows
    denom = (beta + n_new_p) / alpha + l2
    active = np.abs(z) > l1
    safe = np.where(active, denom, F32(1))
    w = np.where(active, (np.sign(z) * l1 - z) / safe, F32(0)).astype(F32)
    return w, np.concatenate([z, n_new], axis=1)


RULES: dict[str, Rule] = {
    "sgd": _sgd,
    "adagrad": _adagrad,
    "rowwise_adagrad": _rowwise_adagrad,
    "sparse_adam": _sparse_adam,
    "ftrl": _ftrl,
}


def apply_rows(
    opt: OptimizerSpec, rows: np.ndarray, state: np.ndarray, grads: np.ndarray, step: int, lr_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One step on coalesced rows. `step` counts this table's pushes including
    this one (torch keeps one step per parameter tensor)."""
    with np.errstate(all="ignore"):
        new_rows, new_state = RULES[opt.type](opt, rows, state, grads, step, lr_scale)
    return (
        np.ascontiguousarray(new_rows, dtype=F32),
        np.ascontiguousarray(new_state, dtype=F32).reshape(len(rows), -1),
    )
