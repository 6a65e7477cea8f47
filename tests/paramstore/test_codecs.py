"""The wire-dtype codecs and top-k with error feedback, without a server."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from paramstore._codecs import dequantize_int8, from_bfloat16, quantize_int8, to_bfloat16
from paramstore._compress import Residuals, top_indices, topk_fraction
from paramstore._wire import safetensors_entries

rng = np.random.default_rng(7)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shape", [(), (1,), (9,), (4, 7), (3, 2, 5), (0, 4), (5, 0)])
def test_int8_error_is_at_most_half_a_scale_per_row(shape: tuple[int, ...]) -> None:
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
    q, scales = quantize_int8(x)
    assert q.shape == x.shape and q.dtype == np.int8 and scales.dtype == np.float32
    rows = scales.size
    as_rows = (rows, x.size // rows if rows else 0)
    s = scales.astype(np.float64)[:, None]
    exact = np.abs(q.reshape(as_rows) * s - x.reshape(as_rows))  # q * s in float64: no rounding
    assert (exact <= s / 2).all()
    # decoded in float32, the product's own rounding (half an ulp of the value) comes on top
    err = np.abs(dequantize_int8(q, scales) - x).reshape(as_rows)
    assert (err <= s / 2 + np.abs(x.reshape(as_rows)) * 2.0**-24).all()


def test_int8_of_a_large_tensor_is_quantized_in_blocks_within_the_bound() -> None:
    x = rng.standard_normal((3, (1 << 20) + 5)).astype(np.float32)  # rows longer than a block
    for shape in (x.shape, (x.size // 3, 3)):  # and many short rows per block
        q, scales = quantize_int8(x.reshape(shape))
        s = scales.astype(np.float64)[:, None]
        assert (np.abs(q.reshape(len(scales), -1) * s - x.reshape(len(scales), -1)) <= s / 2).all()
        assert np.abs(q).max() == 127


def test_int8_refuses_nonfinite() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8(np.array([1.0, np.nan], np.float32))


def test_bfloat16_round_trip_is_exact_for_bfloat16_values() -> None:
    x = from_bfloat16(rng.integers(0, 0x7F80, 1000).astype(np.uint16))
    assert np.array_equal(from_bfloat16(to_bfloat16(x)), x)


@pytest.mark.parametrize("bad", ["topk:0", "topk:1.0001", "topk:-1", "topk:nan", "topk:", "topk", "randk:0.1"])
def test_topk_fraction_outside_0_1_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        topk_fraction(bad)


@pytest.mark.parametrize("wire_dtype", [None, "float16", "bfloat16"])
def test_topk_sent_plus_residual_equals_the_sum_of_gradients(wire_dtype: str | None) -> None:
    residuals = Residuals()
    total = np.zeros((30, 40))
    sent = np.zeros((30, 40))
    for _ in range(300):
        g = rng.standard_normal((30, 40)).astype(np.float32)
        total += g
        with residuals.grad_request("w", g, wire_dtype, "topk:0.01") as (body, headers):
            parts = safetensors_entries(body)
            idx = parts["indices"][1]
            code, vals = parts["values"]
            assert len(idx) == 12 and headers["Content-Type"] == "application/x-safetensors"
            vals = from_bfloat16(vals) if code == "BF16" else vals.astype(np.float32)
            np.add.at(sent.reshape(-1), idx, vals)
    residual = residuals.peek("w")
    assert residual is not None
    np.testing.assert_allclose(sent + residual, total, rtol=0, atol=1e-3)
    assert np.abs(residual).max() < np.abs(total).max()  # the largest entries did go out


def test_a_failed_push_gives_the_residual_back() -> None:
    residuals = Residuals()
    g = np.arange(10, dtype=np.float32)
    with residuals.grad_request("w", g, None, "topk:0.1"):
        pass
    kept = residuals.peek("w")
    with pytest.raises(RuntimeError), residuals.grad_request("w", g, None, "topk:0.1"):
        raise RuntimeError("network down")
    assert np.array_equal(residuals.peek("w"), kept)


@pytest.mark.parametrize("n,k", [(1 << 18, 2621), (1 << 18, 1), (1 << 18, 40000), (1000, 10), (5, 5)])
def test_top_indices_are_exactly_the_k_largest(n: int, k: int) -> None:
    a = np.abs(rng.standard_normal(n)).astype(np.float32)
    got = top_indices(a, k)
    assert len(got) == k and np.all(np.diff(got) > 0)
    assert np.array_equal(np.sort(a[got]), np.sort(a)[n - k :])


@pytest.mark.parametrize("bad", ["topk:2", "topk:0", "top:0.1"])
def test_train_digits_refuses_a_bad_compress_flag(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--compress", bad])
    assert exit_info.value.code == 2 and "(0, 1]" in capsys.readouterr().err
