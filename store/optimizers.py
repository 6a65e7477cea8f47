"""Server-side update rules, applied inside the replicated state machine.

Each rule follows torch.optim's single-tensor reference update, operation for
operation, so every replica computes the same bytes and a trainer can move from
a local torch optimizer to the store without changing its maths.

Updates are functional: they return new arrays and never write into the ones
they were given, so readers and snapshots can hold stored arrays without locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import Unprocessable, echo

Spec = Mapping[str, Any]  # a normalized optimizer spec (normalize_spec)
State = Mapping[str, Any]  # a tensor's optimizer state: arrays and scalars

# name -> {field: default}
SPECS: dict[str, dict[str, Any]] = {
    "assign": {},
    "sgd": {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
}


# The optimizer state each rule keeps: arrays (shaped like the tensor) and scalars.
STATE_ARRAYS: dict[str, tuple[str, ...]] = {
    "assign": (),
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",),
}
STATE_SCALARS: dict[str, tuple[str, ...]] = {
    "assign": (),
    "sgd": (),
    "adam": ("step",),
    "adamw": ("step",),
    "adagrad": ("step",),
}


def normalize_spec(spec: Any) -> dict[str, Any]:
    """Validate an optimizer spec from a client and fill in defaults."""
    if spec is None:
        return {"type": "assign"}
    if not isinstance(spec, dict):
        raise Unprocessable('optimizer: expected a JSON object such as {"type": "sgd", "lr": 0.1}')
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in SPECS:
        raise Unprocessable(f"optimizer.type: {echo(kind)} is not one of {', '.join(SPECS)}")
    defaults = SPECS[kind]
    unknown = set(spec) - set(defaults) - {"type"}
    if unknown:
        raise Unprocessable(
            f"optimizer.{sorted(unknown)[0]}: unknown field for {kind} (known: {', '.join(defaults) or 'none'})"
        )
    out: dict[str, Any] = {"type": kind}
    for key, default in defaults.items():
        value = spec.get(key, default)
        where = f"optimizer.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise Unprocessable(f"{where}: expected true or false, got {echo(value)}")
        elif isinstance(default, tuple):
            value = list(parse_betas(value, where))
        else:
            if not _is_number(value) or not math.isfinite(_as_float(value)) or value < 0:
                raise Unprocessable(f"{where}: expected a finite number >= 0, got {echo(value)}")
            value = float(value)
        out[key] = value
    if kind == "sgd" and out["nesterov"] and (out["momentum"] <= 0 or out["dampening"] != 0):
        raise Unprocessable("optimizer.nesterov: needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
    return out


# Settings no training uses and that overflow on ordinary gradients (lr 1e308
# turns any gradient >= 2 into Inf even in float64). Checked where a client
# sets an optimizer (api/headers.py), not in the state machine: entries and
# checkpoints written before this check still apply and restore the same way.
MAX_SETTING = 1e6
NEEDS_EPS = ("adam", "adamw", "adagrad")  # eps 0: 0 / 0 = NaN wherever a gradient element is 0


def refuse_degenerate(spec: Spec) -> None:
    """Unprocessable for a normalized spec whose steps can only give NaN or Inf."""
    for key, value in spec.items():
        if isinstance(value, float) and value > MAX_SETTING:
            raise Unprocessable(f"optimizer.{key}: {value:g} is above {MAX_SETTING:g}; steps would overflow")
    if spec["type"] in NEEDS_EPS and spec["eps"] <= 0:
        raise Unprocessable(f"optimizer.eps: must be > 0 for {spec['type']} (0 gives 0/0 = NaN)")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_betas(value: Any, where: str) -> tuple[float, float]:
    """Adam's (beta1, beta2): two numbers in [0, 1), for tensors and tables alike."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(_is_number(v) and 0.0 <= v < 1.0 for v in value)
    ):
        raise Unprocessable(f"{where}: expected two numbers in [0, 1), got {echo(value)}")
    return float(value[0]), float(value[1])


def _as_float(v: float) -> float:
    """float(v), inf for a JSON integer too large for a float (float() raises)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class StepResult:
    value: np.ndarray
    state: dict[str, Any]


def _assign(spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float) -> StepResult:
    return StepResult(grad, dict(state))


BLOCK = 1 << 18  # elements per block: a block's temporaries stay in cache


def _blockwise(
    fn: Callable[..., tuple[Any, ...]], like: np.ndarray, *inputs: np.ndarray | None
) -> tuple[np.ndarray, ...]:
    """Apply the elementwise `fn` to cache-sized blocks of `inputs` (flattened;
    None passes through) and assemble its outputs in arrays shaped like `like`.

    Elementwise maths gives the same bits block by block as on whole arrays,
    without whole-array temporaries: an Adam step on 64 MB otherwise allocates
    ~0.5 GB of short-lived arrays, whose page faults and memory traffic stall
    the other threads of the replica (Raft's tick thread among them)."""
    flat = [None if x is None else x.reshape(-1) for x in inputs]
    n = like.size
    if n <= BLOCK:  # one block: its outputs are fresh arrays already (most pushes are small)
        return tuple(np.asarray(part).reshape(like.shape) for part in fn(*flat))
    outs: list[np.ndarray] = []
    for start in range(0, n, BLOCK):
        end = min(n, start + BLOCK)
        parts = fn(*[None if x is None else x[start:end] for x in flat])
        if not outs:
            outs = [np.empty(n, dtype=np.asarray(part).dtype) for part in parts]
        for out, part in zip(outs, parts, strict=True):
            out[start:end] = part
    return tuple(out.reshape(like.shape) for out in outs)


def _axpy(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """x + alpha * y rounded once, like torch's fused `add_(y, alpha=alpha)`:
    computed in float64 (exact for float16/32 products) and cast back."""
    a = np.float64(x.dtype.type(alpha))

    def block(xb: np.ndarray, yb: np.ndarray) -> tuple[np.ndarray]:
        acc = np.multiply(yb, a, dtype=np.float64)
        np.add(acc, xb, out=acc)  # the same two float64 operations, in one temporary
        return (acc.astype(x.dtype),)

    return _blockwise(block, x, x, y)[0]


def _sgd(spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float) -> StepResult:
    lr = spec["lr"] * lr_scale
    d_p = grad
    if spec["weight_decay"] != 0:
        d_p = _axpy(d_p, param, spec["weight_decay"])
    new_state = dict(state)
    momentum = spec["momentum"]
    if momentum != 0:
        buf = state.get("momentum_buffer")
        # the first step takes d_p itself: arrays are never written in place, so no clone is needed
        buf = d_p if buf is None else _axpy(buf * param.dtype.type(momentum), d_p, 1 - spec["dampening"])
        new_state["momentum_buffer"] = buf
        d_p = _axpy(d_p, buf, momentum) if spec["nesterov"] else buf
    return StepResult(_axpy(param, d_p, -lr), new_state)


def _adam(
    spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float, decoupled: bool = False
) -> StepResult:
    t = param.dtype.type
    lr = spec["lr"] * lr_scale
    beta1, beta2 = spec["betas"]
    wd = spec["weight_decay"]
    step = int(state.get("step", 0)) + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1

    def block(
        p: np.ndarray, g: np.ndarray, m: np.ndarray | None, v: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if wd != 0:
            if decoupled:
                p = p * t(1 - lr * wd)
            else:
                g = g + p * t(wd)
        if m is None:
            m = np.zeros_like(p)
            v = np.zeros_like(p)
        m = m + (g - m) * t(1 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v = v * t(beta2) + g * g * t(1 - beta2)
        denom = np.sqrt(v) / t(math.sqrt(bias_correction2)) + t(spec["eps"])
        return p + (m / denom) * t(-step_size), m, v

    value, m, v = _blockwise(block, param, param, grad, state.get("exp_avg"), state.get("exp_avg_sq"))
    return StepResult(value, {"step": step, "exp_avg": m, "exp_avg_sq": v})


def _adamw(spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float) -> StepResult:
    return _adam(spec, state, param, grad, lr_scale, decoupled=True)


def _adagrad(spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float) -> StepResult:
    t = param.dtype.type
    step = int(state.get("step", 0)) + 1
    clr = spec["lr"] * lr_scale / (1 + (step - 1) * spec["lr_decay"])

    def block(p: np.ndarray, g: np.ndarray, acc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if spec["weight_decay"] != 0:
            g = g + p * t(spec["weight_decay"])
        if acc is None:
            acc = np.full_like(p, spec["initial_accumulator_value"])
        acc = acc + g * g
        std = np.sqrt(acc) + t(spec["eps"])
        return p + (g / std) * t(-clr), acc

    value, acc = _blockwise(block, param, param, grad, state.get("sum"))
    return StepResult(value, {"step": step, "sum": acc})


Rule = Callable[[Spec, State, np.ndarray, np.ndarray, float], StepResult]
RULES: dict[str, Rule] = {
    "assign": _assign,
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
}


def apply_step(spec: Spec, state: State, param: np.ndarray, grad: np.ndarray, lr_scale: float = 1.0) -> StepResult:
    """One optimizer step. Integer tensors only take `assign`."""
    if param.dtype.kind != "f" and spec["type"] != "assign":
        raise Unprocessable(f"optimizer {spec['type']} needs a float tensor, this one is {param.dtype}")
    with np.errstate(all="ignore"):
        result = RULES[spec["type"]](spec, state, param, grad, lr_scale)
    value = np.asarray(result.value, dtype=param.dtype, order="C")  # keeps 0-d (scalar) shapes
    value.flags.writeable = False
    # 0-d arithmetic yields numpy scalars: keep optimizer state as arrays.
    state = {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in result.state.items()}
    return StepResult(value, state)
