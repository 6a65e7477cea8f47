"""store.optimizers against torch.optim, the reference its rules claim to follow.

Each case runs 100 steps of random float32 gradients through `apply_step` and
through torch's single-tensor implementation (foreach=False, as on CPU) and
compares the parameters after every step: |ours - torch| <= 1e-6 * max(1, |torch|).
The measured maximum errors are printed (run with -s to see them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from store.optimizers import apply_step, normalize_spec

STEPS = 100
TOL = 1e-6

CASES: list[tuple[str, dict]] = [
    ("sgd", {"type": "sgd", "lr": 0.05}),
    ("sgd-momentum", {"type": "sgd", "lr": 0.05, "momentum": 0.9}),
    ("sgd-dampening", {"type": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("sgd-nesterov", {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd-weight-decay", {"type": "sgd", "lr": 0.05, "weight_decay": 0.01}),
    ("sgd-all", {"type": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}),
    ("adam", {"type": "adam", "lr": 0.01}),
    ("adam-weight-decay", {"type": "adam", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05}),
    ("adamw", {"type": "adamw", "lr": 0.01}),
    ("adamw-weight-decay", {"type": "adamw", "lr": 0.01, "betas": [0.85, 0.995], "weight_decay": 0.1}),
    ("adagrad", {"type": "adagrad", "lr": 0.05}),
    (
        "adagrad-all",
        {
            "type": "adagrad",
            "lr": 0.05,
            "lr_decay": 0.01,
            "weight_decay": 0.01,
            "initial_accumulator_value": 0.1,
            "eps": 1e-8,
        },
    ),
]

MEASURED: dict[str, float] = {}


def torch_optimizer(spec: dict, param: torch.nn.Parameter) -> torch.optim.Optimizer:
    kind = spec["type"]
    common = {"foreach": False}
    if kind == "sgd":
        return torch.optim.SGD(
            [param],
            lr=spec["lr"],
            momentum=spec["momentum"],
            dampening=spec["dampening"],
            nesterov=spec["nesterov"],
            weight_decay=spec["weight_decay"],
            **common,
        )
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(
            [param],
            lr=spec["lr"],
            betas=tuple(spec["betas"]),
            eps=spec["eps"],
            weight_decay=spec["weight_decay"],
            **common,
        )
    if kind == "adagrad":
        return torch.optim.Adagrad(
            [param],
            lr=spec["lr"],
            lr_decay=spec["lr_decay"],
            weight_decay=spec["weight_decay"],
            initial_accumulator_value=spec["initial_accumulator_value"],
            eps=spec["eps"],
            **common,
        )
    raise AssertionError(kind)


def max_relative_error(
    spec: dict, seed: int = 0, shape: tuple[int, ...] = (37, 29), reference: dict | None = None
) -> float:
    """Worst relative error of ours (`spec`) against torch running `reference` (default: the same spec)."""
    rng = np.random.default_rng(seed)
    start = rng.normal(0, 1, shape).astype(np.float32)
    grads = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(STEPS)]
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    opt = torch_optimizer(reference or spec, param)
    ours, state = start, {}
    worst = 0.0
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        result = apply_step(spec, state, ours, g)
        ours, state = result.value, result.state
        ref = param.detach().numpy().astype(np.float64)
        err = np.abs(ours.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref))
        worst = max(worst, float(err.max()))
    assert ours.dtype == np.float32
    return worst


@pytest.mark.parametrize("label,raw", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(label: str, raw: dict) -> None:
    spec = normalize_spec(raw)
    worst = max(max_relative_error(spec, seed) for seed in range(3))
    MEASURED[label] = worst
    print(f"\n{label:20s} max relative error over {STEPS} steps: {worst:.3e}")
    assert worst <= TOL, f"{label}: max relative error {worst:.3e} > {TOL:g}"


def test_report_measured_errors() -> None:
    """A summary line for every case measured in this run (order-independent), each within tolerance."""
    for label, raw in CASES:
        if label not in MEASURED:
            MEASURED[label] = max_relative_error(normalize_spec(raw))
    print("\nmax relative error vs torch.optim (float32, 100 steps):")
    for label, worst in MEASURED.items():
        print(f"  {label:20s} {worst:.3e}")
    assert sorted(MEASURED) == sorted(label for label, _ in CASES)
    too_far = {label: worst for label, worst in MEASURED.items() if not 0.0 <= worst <= TOL}
    assert not too_far, f"max relative errors outside [0, {TOL:g}]: {too_far}"


@pytest.mark.parametrize(
    "ours,reference",
    [
        ({"type": "adam", "lr": 0.01, "weight_decay": 0.1}, {"type": "adamw", "lr": 0.01, "weight_decay": 0.1}),
        ({"type": "sgd", "lr": 0.05, "momentum": 0.9}, {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}),
        ({"type": "adagrad", "lr": 0.05}, {"type": "adagrad", "lr": 0.05, "lr_decay": 0.01}),
    ],
    ids=["adam-vs-adamw", "momentum-vs-nesterov", "adagrad-lr-decay"],
)
def test_comparison_tells_rules_apart(ours: dict, reference: dict) -> None:
    """The measurement is sharp enough that a neighbouring rule would fail test_matches_torch."""
    assert max_relative_error(normalize_spec(ours), reference=normalize_spec(reference)) > 100 * TOL
