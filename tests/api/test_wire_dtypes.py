"""Compressed pulls and pushes (issue 14 items 1-2) on one real replica:
X-Wire-Dtype reads of tensors, batches and table rows against numpy's own
conversions and a reference bfloat16 rounding; narrowed, int8 and sparse
gradient pushes widened before the optimizer; the bad-input rows (a 4xx
JSON error, nothing stored changes)."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save
from starlette.testclient import TestClient

from tests.helpers.apps import single_node_app
from tests.waiting import wait_until

ST = "application/x-safetensors"
OCTET = "application/octet-stream"
_names = itertools.count()
rng = np.random.default_rng(14)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # 16 MB bodies: the large cases cross the 1 MB off-loop and 4 MB streaming thresholds
    app = single_node_app(tmp_path_factory.mktemp("wire"), limits={"max_body_bytes": 16 << 20, "max_partitions": 8})
    with TestClient(app) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 15, "single replica ready")
        yield c


def create(client: TestClient, value: np.ndarray, optimizer: str = '{"type": "sgd", "lr": 1.0}') -> str:
    name = f"wd{next(_names)}"
    r = client.put(
        f"/v1/tensors/{name}",
        content=value.tobytes(),
        headers={
            "Content-Type": OCTET,
            "X-Dtype": str(value.dtype),
            "X-Shape": ",".join(map(str, value.shape)),
            "X-Optimizer": optimizer,
        },
    )
    assert r.status_code == 201, r.text
    return name


def stored(client: TestClient, name: str) -> tuple[np.ndarray, int]:
    r = client.get(f"/v1/tensors/{name}")
    assert r.status_code == 200
    shape = tuple(int(d) for d in r.headers["X-Shape"].split(",") if d)
    return np.frombuffer(r.content, dtype=r.headers["X-Dtype"]).reshape(shape), int(r.headers["X-Version"])


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits by the definition: the nearer of the two bfloat16 values
    around x (computed in float64), the one with an even last bit on a tie."""
    out = np.empty(x.size, dtype=np.uint16)
    for i, v in enumerate(x.astype(np.float32).reshape(-1)):
        (bits,) = struct.unpack("<I", struct.pack("<f", v))
        lo = bits & 0xFFFF0000
        if lo == bits:  # exact (zeros, infinities, values already bfloat16)
            out[i] = lo >> 16
            continue
        hi = lo + 0x10000
        f_lo = struct.unpack("<f", struct.pack("<I", lo))[0]
        f_hi = struct.unpack("<f", struct.pack("<I", hi & 0xFFFFFFFF))[0] if hi <= 0xFFFFFFFF else float("inf")
        d_lo, d_hi = abs(float(v) - f_lo), abs(f_hi - float(v))
        pick = lo if d_lo < d_hi or (d_lo == d_hi and not (lo >> 16) & 1) else hi
        out[i] = pick >> 16
    return out.reshape(x.shape)


def awkward_floats(n: int) -> np.ndarray:
    """Random magnitudes plus exact bfloat16 ties (low 16 bits 0x8000), both parities."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[: n // 4] = (bits[: n // 4] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    return x


def get(client: TestClient, name: str, wire_dtype: str, **params: Any) -> Any:
    return client.get(f"/v1/tensors/{name}", headers={"X-Wire-Dtype": wire_dtype}, params=params)


# ---- pulls ------------------------------------------------------------------------------
def test_float16_pull_is_numpys_conversion(client: TestClient) -> None:
    value = awkward_floats(600).reshape(20, 30) / np.float32(1e4)
    name = create(client, value)
    r = get(client, name, "float16")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == OCTET
    assert (r.headers["X-Wire-Dtype"], r.headers["X-Dtype"], r.headers["X-Shape"]) == ("float16", "float32", "20,30")
    got = np.frombuffer(r.content, dtype="<f2").reshape(20, 30)
    assert got.tobytes() == value.astype(np.float16).tobytes()
    after, version = stored(client, name)
    assert version == 1 and np.array_equal(after, value)  # the stored value never changes


def test_bfloat16_pull_rounds_to_nearest_even(client: TestClient) -> None:
    value = awkward_floats(512)
    value[:3] = [np.nan, np.inf, -0.0]
    name = f"wd{next(_names)}"  # NaN and Inf need allow_nonfinite
    r = client.put(
        f"/v1/tensors/{name}",
        content=value.tobytes(),
        headers={"Content-Type": OCTET, "X-Dtype": "float32", "X-Shape": "512", "X-Allow-Nonfinite": "true"},
    )
    assert r.status_code == 201, r.text
    r = get(client, name, "bfloat16")
    assert r.status_code == 200 and r.headers["X-Wire-Dtype"] == "bfloat16"
    got = np.frombuffer(r.content, dtype="<u2")
    want = bf16_reference(value)
    assert np.isnan((got[:1].astype(np.uint32) << 16).view(np.float32)).all()  # NaN stays NaN
    assert np.array_equal(got[1:], want[1:])


def test_int8_pull_error_is_within_half_a_scale_per_row(client: TestClient) -> None:
    value = (rng.standard_normal((8, 5, 3)) * np.logspace(-3, 3, 8)[:, None, None]).astype(np.float32)
    value[3] = 0  # an all-zero row: scale 0, exact
    name = create(client, value)
    r = get(client, name, "int8")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ST and r.headers["X-Wire-Dtype"] == "int8"
    parts = load(r.content)
    q, scales = parts["values"], parts["scales"]
    assert q.dtype == np.int8 and q.shape == (8, 5, 3) and scales.dtype == np.float32 and scales.shape == (8,)
    assert scales[3] == 0
    np.testing.assert_allclose(scales, np.abs(value).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(q.astype(np.float32) * scales[:, None, None] - value).reshape(8, -1)
    assert (err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    assert np.abs(q).max() == 127


def test_int8_of_a_vector_and_a_scalar_is_one_row(client: TestClient) -> None:
    for value in (np.linspace(-3, 5, 7, dtype=np.float32), np.array(2.5, np.float32)):
        parts = load(get(client, create(client, value), "int8").content)
        assert parts["scales"].shape == (1,) and parts["values"].shape == value.shape
        assert np.abs(parts["values"] * parts["scales"][0] - value).max() <= parts["scales"][0] / 2 * 1.00001


def test_float64_tensor_and_rows_and_head(client: TestClient) -> None:
    value = rng.standard_normal((6, 4))
    name = create(client, value)
    r = get(client, name, "float16", rows="1,4")
    assert r.status_code == 200 and r.headers["X-Shape"] == "2,4" and r.headers["X-Dtype"] == "float64"
    assert r.content == value[[1, 4]].astype(np.float16).tobytes()
    for wire_dtype in ("float16", "bfloat16", "int8"):
        head = client.head(f"/v1/tensors/{name}", headers={"X-Wire-Dtype": wire_dtype})
        full = get(client, name, wire_dtype)
        assert head.status_code == 200 and head.content == b"" and head.headers["X-Wire-Dtype"] == wire_dtype
        assert int(head.headers["content-length"]) == len(full.content)


def test_large_pull_is_streamed_and_exact(client: TestClient) -> None:
    value = rng.standard_normal((1 << 21) + 3).astype(np.float32)  # 8 MB: converted off the loop, 4+ MB body
    r = client.put(
        "/v1/tensors/wd-large", content=value.tobytes(), headers={"X-Dtype": "float32", "X-Shape": str(value.size)}
    )
    assert r.status_code == 201
    for wire_dtype, want in (("float16", value.astype(np.float16).tobytes()), ("bfloat16", None)):
        r = get(client, "wd-large", wire_dtype)
        assert r.status_code == 200 and int(r.headers["content-length"]) == 2 * value.size
        if want is not None:
            assert r.content == want
    parts = load(get(client, "wd-large", "int8").content)
    assert np.abs(parts["values"] * parts["scales"][0] - value).max() <= parts["scales"][0] / 2 * 1.00001


def test_batch_pull_in_each_wire_dtype(client: TestClient) -> None:
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    na, nb = create(client, a), create(client, b)
    for wire_dtype in ("float16", "bfloat16", "int8"):
        r = client.get("/v1/tensors:batch", params={"names": f"{na},{nb}"}, headers={"X-Wire-Dtype": wire_dtype})
        assert r.status_code == 200, r.text
        n = int.from_bytes(r.content[:8], "little")
        header = json.loads(r.content[8 : 8 + n])
        assert json.loads(header["__metadata__"]["versions"]) == {na: 1, nb: 1}
        assert header["__metadata__"]["wire_dtype"] == wire_dtype
        body = r.content[8 + n :]

        def raw(key: str, header: dict[str, Any] = header, body: bytes = body) -> bytes:
            start, end = header[key]["data_offsets"]
            return body[start:end]

        if wire_dtype == "float16":
            assert header[na]["dtype"] == "F16" and raw(na) == a.astype(np.float16).tobytes()
        elif wire_dtype == "bfloat16":
            assert header[nb]["dtype"] == "BF16" and raw(nb) == bf16_reference(b).tobytes()
        else:
            assert header[na]["dtype"] == "I8" and header[na + "/scales"]["shape"] == [3]
            q = np.frombuffer(raw(na), np.int8).reshape(3, 4)
            s = np.frombuffer(raw(na + "/scales"), np.float32)
            assert (np.abs(q * s[:, None] - a) <= s[:, None] / 2 * 1.00001).all()


def test_unknown_wire_dtype_is_406_with_the_list(client: TestClient) -> None:
    name = create(client, np.ones(3, np.float32))
    for route, call in (
        ("get", lambda h: client.get(f"/v1/tensors/{name}", headers=h)),
        ("batch", lambda h: client.get("/v1/tensors:batch", params={"names": name}, headers=h)),
    ):
        r = call({"X-Wire-Dtype": "float8"})
        assert r.status_code == 406, (route, r.text)
        assert r.json()["error"] == "not_acceptable" and r.json()["supported"] == ["float16", "bfloat16", "int8"]
    ints = create(client, np.arange(4, dtype=np.int32), '{"type": "assign"}')
    r = get(client, ints, "float16")  # what is stored decides: 422, as a write of the wrong dtype
    assert r.status_code == 422 and "float tensors only" in r.json()["detail"]
    r = client.get("/v1/tensors:batch", params={"names": f"{name},{ints}"}, headers={"X-Wire-Dtype": "int8"})
    assert r.status_code == 422
    r = client.get(f"/v1/tensors/{name}", headers={"X-Wire-Dtype": "float16", "Accept": "application/json"})
    assert r.status_code == 406  # a narrowed tensor is raw bytes


def test_int8_of_nonfinite_values_is_refused(client: TestClient) -> None:
    name = f"wd{next(_names)}"
    client.put(
        f"/v1/tensors/{name}",
        content=np.array([1, np.inf], np.float32).tobytes(),
        headers={"X-Dtype": "float32", "X-Shape": "2", "X-Allow-Nonfinite": "true"},
    )
    r = get(client, name, "int8")
    assert r.status_code == 422 and "NaN or Inf" in r.json()["detail"]


# ---- pushes -----------------------------------------------------------------------------
def push(client: TestClient, name: str, body: bytes, **headers: str) -> Any:
    return client.post(f"/v1/tensors/{name}/grad", content=body, headers=headers)


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_narrow_raw_push_is_widened_before_the_optimizer(client: TestClient, wire_dtype: str) -> None:
    value = rng.standard_normal((4, 6)).astype(np.float32)
    name = create(client, value)  # sgd, lr 1: value - grad
    g = rng.standard_normal((4, 6)).astype(np.float32)
    if wire_dtype == "float16":
        body, widened = g.astype(np.float16).tobytes(), g.astype(np.float16).astype(np.float32)
    else:
        bits = bf16_reference(g)
        body, widened = bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32)
    r = push(client, name, body, **{"X-Dtype": wire_dtype, "Content-Type": OCTET})
    assert r.status_code == 200, r.text
    assert np.array_equal(stored(client, name)[0], value - widened)
    # with X-Shape too, and into a float64 tensor
    v64 = rng.standard_normal(6)
    n64 = create(client, v64)
    r = push(client, n64, body[:12], **{"X-Dtype": wire_dtype, "X-Shape": "6"})
    assert r.status_code == 200, r.text
    assert np.array_equal(stored(client, n64)[0], v64 - widened.reshape(-1)[:6].astype(np.float64))


def test_large_narrow_push(client: TestClient) -> None:
    n = 3 << 20  # 6 MB of float16: widened off the loop, no cut-through stream of the narrow bytes
    value = np.zeros(n, np.float32)
    name = create(client, value)
    g = rng.standard_normal(n).astype(np.float16)
    r = push(client, name, g.tobytes(), **{"X-Dtype": "float16"})
    assert r.status_code == 200, r.text
    assert np.array_equal(stored(client, name)[0], -g.astype(np.float32))


def test_int8_push_with_scales(client: TestClient) -> None:
    value = np.zeros((3, 4), np.float32)
    name = create(client, value)
    q = rng.integers(-127, 128, (3, 4)).astype(np.int8)
    s = np.array([0.5, 0.01, 2.0], np.float32)
    r = push(client, name, save({"values": q, "scales": s}), **{"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert np.array_equal(stored(client, name)[0], -(q.astype(np.float32) * s[:, None]))


def test_sparse_push_scatters_and_sums_duplicates(client: TestClient) -> None:
    value = np.zeros((4, 5), np.float32)
    name = create(client, value)
    idx = np.array([0, 7, 19, 7], np.int64)
    vals = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
    r = push(client, name, save({"indices": idx, "values": vals.astype(np.float16)}), **{"Content-Type": ST})
    assert r.status_code == 200, r.text
    want = np.zeros(20, np.float32)
    want[[0, 7, 19]] = [-1.0, -2.5, -3.0]
    assert np.array_equal(stored(client, name)[0].reshape(-1), want)


def test_compressed_push_bad_input_changes_nothing(client: TestClient) -> None:
    value = np.ones((2, 3), np.float32)
    name = create(client, value)
    ints = create(client, np.arange(6, dtype=np.int64).reshape(2, 3), '{"type": "assign"}')
    q = np.ones((2, 3), np.int8)
    cases = [
        (name, save({"values": q}), {"Content-Type": ST}, 422, "scales"),  # int8 without scales
        (name, save({"values": q, "scales": np.ones(3, np.float32)}), {"Content-Type": ST}, 422, "scales"),
        (name, save({"values": q, "scales": np.array([1, -1], np.float32)}), {"Content-Type": ST}, 422, ">= 0"),
        (name, save({"values": q.astype(np.int16), "scales": np.ones(2, np.float32)}), {"Content-Type": ST}, 422, ""),
        (
            name,
            save({"indices": np.array([6], np.int64), "values": np.ones(1, np.float32)}),
            {"Content-Type": ST},
            422,
            "[0, 6)",
        ),
        (
            name,
            save({"indices": np.array([-1], np.int64), "values": np.ones(1, np.float32)}),
            {"Content-Type": ST},
            422,
            "",
        ),
        (
            name,
            save({"indices": np.array([0], np.int32), "values": np.ones(1, np.float32)}),
            {"Content-Type": ST},
            422,
            "I64",
        ),
        (
            name,
            save({"indices": np.array([0, 1], np.int64), "values": np.ones(1, np.float32)}),
            {"Content-Type": ST},
            422,
            "",
        ),
        (name, save({"grad": np.ones(6, np.float32)}), {"Content-Type": ST}, 422, "got ['grad']"),
        (name, b"not safetensors", {"Content-Type": ST}, 422, "safetensors"),
        (name, np.ones(5, np.float16).tobytes(), {"X-Dtype": "float16"}, 422, "bytes"),
        (name, np.ones(6, np.float16).tobytes(), {"X-Dtype": "float16", "X-Shape": "3,2"}, 422, ""),
        (name, np.full(6, np.inf, np.float16).tobytes(), {"X-Dtype": "float16"}, 422, "NaN or Inf"),
        (ints, np.ones(6, np.float16).tobytes(), {"X-Dtype": "float16"}, 422, ""),
        (ints, save({"values": q, "scales": np.ones(2, np.float32)}), {"Content-Type": ST}, 422, "float tensors"),
        ("wd-absent", save({"values": q, "scales": np.ones(2, np.float32)}), {"Content-Type": ST}, 404, ""),
    ]
    for target, body, headers, status, words in cases:
        r = push(client, target, body, **headers)
        assert r.status_code == status, (headers, r.text)
        assert "error" in r.json() and words in r.json()["detail"], r.json()
    after, version = stored(client, name)
    assert version == 1 and np.array_equal(after, value) and stored(client, ints)[1] == 1


# ---- tables -----------------------------------------------------------------------------
def test_table_lookup_in_each_wire_dtype_and_narrow_row_pushes(client: TestClient) -> None:
    r = client.put("/v1/tables/wdtab", json={"dim": 4, "initializer": {"type": "normal", "std": 1, "seed": 3}})
    assert r.status_code == 201, r.text
    ids = np.array([5, 9, 1 << 40], np.int64)
    body = save({"ids": ids})
    plain = load(client.post("/v1/tables/wdtab:lookup", content=body, headers={"Content-Type": ST}).content)["rows"]
    for wire_dtype in ("float16", "bfloat16", "int8"):
        r = client.post(
            "/v1/tables/wdtab:lookup", content=body, headers={"Content-Type": ST, "X-Wire-Dtype": wire_dtype}
        )
        assert r.status_code == 200 and r.headers["X-Wire-Dtype"] == wire_dtype, r.text
        n = int.from_bytes(r.content[:8], "little")
        header = json.loads(r.content[8 : 8 + n])
        start, end = header["rows"]["data_offsets"]
        raw = r.content[8 + n + start : 8 + n + end]
        if wire_dtype == "float16":
            assert raw == plain.astype(np.float16).tobytes()
        elif wire_dtype == "bfloat16":
            assert raw == bf16_reference(plain).tobytes()
        else:
            parts = load(r.content)
            assert parts["scales"].shape == (3,)
            assert (
                np.abs(parts["rows"] * parts["scales"][:, None] - plain) <= parts["scales"][:, None] / 2 * 1.00001
            ).all()
    r = client.post("/v1/tables/wdtab:lookup", content=body, headers={"Content-Type": ST, "X-Wire-Dtype": "fp8"})
    assert r.status_code == 406 and r.json()["supported"] == ["float16", "bfloat16", "int8"]
    # row pushes take float16 grads (the default optimizer: sgd, lr 0.01)
    g = np.full((3, 4), 2.0, np.float16)
    r = client.post("/v1/tables/wdtab:push", content=save({"ids": ids, "grads": g}), headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    after = load(client.post("/v1/tables/wdtab:lookup", content=body, headers={"Content-Type": ST}).content)["rows"]
    assert not np.array_equal(after, plain)


def test_batch_push_widens_narrow_and_int8_gradients(client: TestClient) -> None:
    a, b, c = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
    na, nb, nc = create(client, a), create(client, b), create(client, c)
    ga, gb = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
    q = rng.integers(-127, 128, (3, 4)).astype(np.int8)
    s = np.array([0.1, 0.2, 0.3], np.float32)
    header = {
        na: {"dtype": "F16", "shape": [3, 4], "data": ga.astype(np.float16).tobytes()},
        nb: {"dtype": "BF16", "shape": [3, 4], "data": bf16_reference(gb).tobytes()},
        nc: {"dtype": "I8", "shape": [3, 4], "data": q.tobytes()},
        nc + "/scales": {"dtype": "F32", "shape": [3], "data": s.tobytes()},
    }
    r = client.post("/v1/grads:batch", content=st_file(header), headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert r.json()["versions"] == {na: 2, nb: 2, nc: 2}
    assert np.array_equal(stored(client, na)[0], a - ga.astype(np.float16).astype(np.float32))
    assert np.array_equal(stored(client, nb)[0], b - (bf16_reference(gb).astype(np.uint32) << 16).view(np.float32))
    assert np.array_equal(stored(client, nc)[0], c - q.astype(np.float32) * s[:, None])
    # int8 without its scales: 422, nothing applied
    r = client.post("/v1/grads:batch", content=st_file({nc: header[nc]}), headers={"Content-Type": ST})
    assert r.status_code == 422 and "scales" in r.json()["detail"]
    assert stored(client, nc)[1] == 2


def st_file(entries: dict[str, dict[str, Any]]) -> bytes:
    """A safetensors file from raw entries (numpy has no bfloat16 for safetensors' own writer)."""
    header: dict[str, Any] = {}
    offset = 0
    for key, e in entries.items():
        header[key] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + len(e["data"])]}
        offset += len(e["data"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(e["data"] for e in entries.values())


def test_partitioned_tensor_in_wire_dtypes(client: TestClient) -> None:
    """Reads are narrowed whole (int8: one scale per row of the whole tensor, a
    vector's single row spanning its parts); compressed pushes are widened whole
    and split like any gradient."""
    for value in (rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal(9).astype(np.float32)):
        name = f"wdp{next(_names)}"
        r = client.put(
            f"/v1/tensors/{name}",
            content=value.tobytes(),
            headers={
                "X-Dtype": "float32",
                "X-Shape": ",".join(map(str, value.shape)),
                "X-Partitions": "3",
                "X-Optimizer": '{"type": "sgd", "lr": 1.0}',
            },
        )
        assert r.status_code == 201 and len(r.json()["partitions"]) == 3, r.text
        r = get(client, name, "float16")
        assert r.status_code == 200 and r.content == value.astype(np.float16).tobytes()
        assert r.headers["X-Versions"] == "[1,1,1]"
        parts = load(get(client, name, "int8").content)
        rows = value.shape[0] if value.ndim == 2 else 1
        assert parts["scales"].shape == (rows,)
        s = parts["scales"].astype(np.float64).reshape(rows, 1)
        assert (np.abs(parts["values"].reshape(rows, -1) * s - value.reshape(rows, -1)) <= s / 2).all()
        g = rng.standard_normal(value.shape).astype(np.float32)
        r = push(client, name, g.astype(np.float16).tobytes(), **{"X-Dtype": "float16"})
        assert r.status_code == 200 and r.json()["versions"] == [2, 2, 2], r.text
        idx = np.array([0, value.size - 1], np.int64)
        r = push(client, name, save({"indices": idx, "values": np.ones(2, np.float32)}), **{"Content-Type": ST})
        assert r.status_code == 200, r.text
        want = value - g.astype(np.float16).astype(np.float32)
        want.reshape(-1)[idx] -= 1
        got = np.frombuffer(client.get(f"/v1/tensors/{name}").content, np.float32).reshape(value.shape)
        assert np.array_equal(got, want)
