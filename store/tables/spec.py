"""A table's configuration: validated once from client JSON, then immutable.

Every error is an `Unprocessable` (HTTP 422) naming the offending field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import Unprocessable, echo
from ..optimizers import parse_betas
from ..tensor_commands import STALENESS_POLICIES

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
ID_DTYPES = ("int64", "uint64")
INITIALIZERS = ("zeros", "uniform", "normal")
MAX_DIM = 1 << 16
DELTA_VERSIONS = 10_000  # pushes per shard part whose changed IDs delta export can still name
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

# optimizer -> {hyper-parameter: default}. Defaults follow the reference each
# rule is tested against (torch.optim, FBGEMM, TensorFlow's FtrlOptimizer).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0},
    "rowwise_adagrad": {"lr": 0.01, "eps": 1e-8, "weight_decay": 0.0, "initial_accumulator_value": 0.0},
    "sparse_adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8},
    "ftrl": {"lr": 0.01, "lr_power": -0.5, "l1": 0.0, "l2": 0.0, "beta": 0.0, "initial_accumulator_value": 0.1},
}


@dataclass(frozen=True)
class OptimizerSpec:
    type: str
    params: tuple[tuple[str, Any], ...]  # (name, value) in OPTIMIZERS order: hashable and ordered

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for k, v in self.params:
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class InitializerSpec:
    type: str = "zeros"
    seed: int = 0
    bound: float = 0.0  # uniform: values in [-bound, bound)
    std: float = 0.0  # normal: mean 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "seed": self.seed}
        if self.type == "uniform":
            out["bound"] = self.bound
        if self.type == "normal":
            out["std"] = self.std
        return out


@dataclass(frozen=True)
class AdmissionSpec:
    """An ID gets a row once it was pushed `min_count` times (count-min sketch
    of `depth` x `width` saturating 16-bit counters: depth*width*2 bytes)."""

    min_count: int
    width: int = 1 << 18
    depth: int = 4


@dataclass(frozen=True)
class EvictionSpec:
    ttl_versions: int | None = None
    max_rows: int | None = None


@dataclass(frozen=True)
class TableSpec:
    dim: int
    dtype: str = "float32"
    id_dtype: str = "int64"
    initializer: InitializerSpec = field(default_factory=InitializerSpec)
    optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec("sgd", (("lr", 0.01),)))
    admission: AdmissionSpec | None = None
    eviction: EvictionSpec | None = None
    max_staleness: int | None = None
    staleness_policy: str = "reject"
    delta_versions: int = DELTA_VERSIONS

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["initializer"] = self.initializer.to_json()
        out["optimizer"] = self.optimizer.to_json()
        for key in ("admission", "eviction", "max_staleness"):
            if out[key] is None:
                del out[key]
        if out.get("eviction"):
            out["eviction"] = {k: v for k, v in out["eviction"].items() if v is not None}
        return out

    @classmethod
    def from_json(cls, raw: Any) -> TableSpec:
        return parse_spec(raw)


_TOP_FIELDS = {
    "dim",
    "dtype",
    "id_dtype",
    "initializer",
    "optimizer",
    "admission",
    "eviction",
    "max_staleness",
    "staleness_policy",
    "delta_versions",
}


def parse_spec(raw: Any) -> TableSpec:
    """Validate a table configuration (client JSON or a stored `to_json`)."""
    if not isinstance(raw, Mapping):
        raise Unprocessable('table config: expected a JSON object such as {"dim": 64}')
    _no_unknown(raw, _TOP_FIELDS, "table config")
    dim = _int(raw.get("dim"), "dim", lo=1, hi=MAX_DIM)
    dtype = _choice(raw.get("dtype", "float32"), STORAGE_DTYPES, "dtype")
    id_dtype = _choice(raw.get("id_dtype", "int64"), ID_DTYPES, "id_dtype")
    policy = _choice(raw.get("staleness_policy", "reject"), STALENESS_POLICIES, "staleness_policy")
    max_staleness = raw.get("max_staleness")
    if max_staleness is not None:
        max_staleness = _int(max_staleness, "max_staleness", lo=0)
    delta_versions = _int(raw.get("delta_versions", DELTA_VERSIONS), "delta_versions", lo=0, hi=10**8)
    return TableSpec(
        dim=dim,
        dtype=dtype,
        id_dtype=id_dtype,
        initializer=parse_initializer(raw.get("initializer")),
        optimizer=parse_optimizer(raw.get("optimizer")),
        admission=parse_admission(raw.get("admission")),
        eviction=parse_eviction(raw.get("eviction")),
        max_staleness=max_staleness,
        staleness_policy=policy,
        delta_versions=delta_versions,
    )


def parse_initializer(raw: Any) -> InitializerSpec:
    if raw is None:
        return InitializerSpec()
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        raise Unprocessable('initializer: expected an object such as {"type": "normal", "std": 0.01}')
    kind = _choice(raw.get("type", "zeros"), INITIALIZERS, "initializer.type")
    allowed = {"type", "seed"} | {"uniform": {"bound"}, "normal": {"std"}, "zeros": set()}[kind]
    _no_unknown(raw, allowed, f"initializer ({kind})")
    seed = _int(raw.get("seed", 0), "initializer.seed", lo=0, hi=(1 << 64) - 1)
    bound = std = 0.0
    if kind == "uniform":
        bound = _float(raw.get("bound", 0.01), "initializer.bound", positive=True)
    if kind == "normal":
        std = _float(raw.get("std", 0.01), "initializer.std", positive=True)
    return InitializerSpec(kind, seed, bound, std)


def parse_optimizer(raw: Any) -> OptimizerSpec:
    if raw is None:
        raw = {"type": "sgd"}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, Mapping):
        raise Unprocessable('optimizer: expected an object such as {"type": "rowwise_adagrad", "lr": 0.05}')
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in OPTIMIZERS:
        raise Unprocessable(f"optimizer.type: {echo(kind)} is not one of {', '.join(OPTIMIZERS)}")
    defaults = OPTIMIZERS[kind]
    _no_unknown(raw, set(defaults) | {"type"}, f"optimizer ({kind})")
    params: list[tuple[str, Any]] = []
    for key, default in defaults.items():
        where = f"optimizer.{key}"
        value = raw.get(key, default)
        if isinstance(default, tuple):
            value = parse_betas(value, where)
        elif key == "lr_power":
            value = _float(value, where, hi=0.0)
        elif key in ("lr",):
            value = _float(value, where, positive=True)
        elif key == "eps" and kind in ("adagrad", "rowwise_adagrad", "sparse_adam"):
            value = _float(value, where, positive=True)  # sqrt(0) + 0 would divide by zero
        else:
            value = _float(value, where)
        params.append((key, value))
    return OptimizerSpec(kind, tuple(params))


def parse_admission(raw: Any) -> AdmissionSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise Unprocessable('admission: expected an object such as {"min_count": 3}')
    _no_unknown(raw, {"min_count", "width", "depth"}, "admission")
    return AdmissionSpec(
        min_count=_int(raw.get("min_count"), "admission.min_count", lo=1, hi=65535),
        width=_int(raw.get("width", 1 << 18), "admission.width", lo=64, hi=1 << 26),
        depth=_int(raw.get("depth", 4), "admission.depth", lo=1, hi=8),
    )


def parse_eviction(raw: Any) -> EvictionSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise Unprocessable('eviction: expected an object such as {"ttl_versions": 1000}')
    _no_unknown(raw, {"ttl_versions", "max_rows"}, "eviction")
    ttl = raw.get("ttl_versions")
    max_rows = raw.get("max_rows")
    if ttl is None and max_rows is None:
        raise Unprocessable("eviction: give ttl_versions, max_rows or both")
    return EvictionSpec(
        ttl_versions=None if ttl is None else _int(ttl, "eviction.ttl_versions", lo=1),
        max_rows=None if max_rows is None else _int(max_rows, "eviction.max_rows", lo=1),
    )


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Unprocessable(f"table name {echo(name)}: use 1-200 letters, digits, '_', '-' or '.'")
    return name


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise Unprocessable(f"{where}: unknown field {echo(unknown[0])} (known: {', '.join(sorted(allowed))})")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise Unprocessable(f"{where}: expected an integer, got {echo(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise Unprocessable(f"{where}: {v} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def _float(v: Any, where: str, positive: bool = False, hi: float | None = None) -> float:
    if not _is_number(v) or not math.isfinite(v):
        raise Unprocessable(f"{where}: expected a finite number, got {echo(v)}")
    v = float(v)
    if hi is not None:
        if v > hi:
            raise Unprocessable(f"{where}: expected a number <= {hi}, got {echo(v)}")
    elif positive and v <= 0:
        raise Unprocessable(f"{where}: expected a number > 0, got {echo(v)}")
    elif not positive and v < 0:
        raise Unprocessable(f"{where}: expected a number >= 0, got {echo(v)}")
    return float(v)


def _choice(v: Any, options: tuple[str, ...], where: str) -> str:
    if v not in options:
        raise Unprocessable(f"{where}: {echo(v)} is not one of {', '.join(options)}")
    return str(v)
