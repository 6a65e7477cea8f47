"""Malformed values from the adversarial probe (issue 17, item 7): each is a
4xx with the JSON error body, and nothing is committed."""

import io
import json

import pytest
from numpy.lib import format as npf

from store import dtypes
from store.errors import Unprocessable

RAW = "application/octet-stream"
JSON = "application/json"
HUGE_INT = "1" + "0" * 400  # too large for a float: float() raises OverflowError
OVERFLOWING_SHAPE = [0, 2**62, 2**62]


@pytest.fixture(scope="module")
def base(client):
    r = client.put(
        "/v1/tensors/mv-base", content=b"\0" * 8, headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "2"}
    )
    assert r.status_code in (200, 201), r.text
    return "mv-base"


def _listing(client) -> dict[str, int]:
    r = client.get("/v1/tensors")
    assert r.status_code == 200
    return {t["name"]: t["version"] for t in r.json()}


def _refused(client, r, status: int) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] in ("invalid_request", "unprocessable") and body["detail"], body


def _npy_header(shape: list[int]) -> bytes:
    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


@pytest.mark.parametrize(
    "value", ["--1", "-+1", "+1", "1-", "\u0663".encode(), "\u00b2".encode(), str(2**63), "9" * 400, " ", "1 2"]
)
def test_bad_integer_headers_are_400(client, base, value):
    before = _listing(client)
    r = client.post(
        f"/v1/tensors/{base}/grad", content=b"\0" * 8, headers={"Content-Type": RAW, "X-Base-Version": value}
    )
    _refused(client, r, 400)
    r = client.put(
        "/v1/tensors/mv-staleness",
        content=b"\0" * 4,
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1", "X-Max-Staleness": value},
    )
    _refused(client, r, 400)
    assert _listing(client) == before


@pytest.mark.parametrize("value", ['"--1"', '"' + "9" * 30 + '"', 'W/"\u0663"'.encode()])
def test_bad_version_tags_are_400(client, base, value):
    before = _listing(client)
    r = client.delete(f"/v1/tensors/{base}", headers={"If-Match": value})
    _refused(client, r, 400)
    assert _listing(client) == before


def test_zero_size_shape_with_overflowing_dimensions_is_refused_before_raft(client):
    before = _listing(client)
    r = client.put(
        "/v1/tensors/mv-zero",
        content=b"",
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": ",".join(map(str, OVERFLOWING_SHAPE))},
    )
    _refused(client, r, 422)
    r = client.put(
        "/v1/tensors/mv-zero",
        content=json.dumps({"data": [], "shape": OVERFLOWING_SHAPE}),
        headers={"Content-Type": JSON},
    )
    _refused(client, r, 422)
    r = client.put(
        "/v1/tensors/mv-zero", content=_npy_header(OVERFLOWING_SHAPE), headers={"Content-Type": "application/x-npy"}
    )
    _refused(client, r, 422)
    assert _listing(client) == before


def test_zero_size_shapes_that_fit_are_still_fine(client):
    r = client.put(
        "/v1/tensors/mv-empty", content=b"", headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "0,3"}
    )
    assert r.status_code == 201, r.text
    assert client.get("/v1/tensors/mv-empty").headers["x-shape"] == "0,3"


def test_the_state_machine_refuses_an_overflowing_shape_itself():
    """A command that got past the API (an older replica, a crafted log
    entry) fails as a StoreError on every replica, not inside numpy."""
    with pytest.raises(Unprocessable):
        dtypes.array_from_bytes(b"", "float32", tuple(OVERFLOWING_SHAPE))


@pytest.mark.parametrize("depth", [200_000, 5_000])
def test_deeply_nested_json_is_400(client, base, depth):
    before = _listing(client)
    nested = "[" * depth + "]" * depth
    r = client.put("/v1/tensors/mv-nested", content='{"data": ' + nested + "}", headers={"Content-Type": JSON})
    _refused(client, r, 400)
    r = client.put(
        "/v1/tensors/mv-nested",
        content=b"\0" * 4,
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1", "X-Optimizer": nested},
    )
    _refused(client, r, 400)
    r = client.post(
        "/v1/grads:batch", content=b"", headers={"Content-Type": "application/x-safetensors", "X-Base-Versions": nested}
    )
    _refused(client, r, 400)
    members_nested = "[" * 5000 + "]" * 5000  # under the 64 KiB cap of that body
    r = client.post("/v1/cluster/members", content=members_nested, headers={"Content-Type": JSON})
    _refused(client, r, 400)
    assert _listing(client) == before


@pytest.mark.parametrize("dim", ["Infinity", "-Infinity", "NaN", "1e400", HUGE_INT])
def test_non_finite_or_huge_numbers_in_a_json_shape_are_refused(client, dim):
    before = _listing(client)
    r = client.put(
        "/v1/tensors/mv-shape", content='{"data": [1], "shape": [' + dim + "]}", headers={"Content-Type": JSON}
    )
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"] in ("invalid_request", "unprocessable")
    assert _listing(client) == before


@pytest.mark.parametrize(
    "spec",
    [
        '{"type": "sgd", "lr": ' + HUGE_INT + "}",
        '{"type": "sgd", "lr": 1e400}',
        '{"type": "adam", "eps": -' + HUGE_INT + "}",
        '{"type": "adam", "betas": [' + HUGE_INT + ", 0.9]}",
        '{"type": "adagrad", "lr_decay": ' + HUGE_INT + "}",
    ],
)
def test_numbers_too_large_for_a_float_in_optimizer_settings_are_422(client, spec):
    before = _listing(client)
    r = client.put(
        "/v1/tensors/mv-opt",
        content=b"\0" * 4,
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1", "X-Optimizer": spec},
    )
    _refused(client, r, 422)
    assert len(r.json()["detail"]) < 300  # the input is not echoed whole
    assert _listing(client) == before


@pytest.mark.parametrize("rows", [HUGE_INT, "1e400", str(2**63), "-1", "1.5", "inf"])
def test_rows_too_large_or_not_integers_are_400(client, base, rows):
    r = client.get(f"/v1/tensors/{base}", params={"rows": rows})
    _refused(client, r, 400)


def test_a_chunked_membership_body_is_refused_as_soon_as_it_passes_its_cap(client):
    sent = []

    def chunks():
        for _ in range(64):  # 4 MiB in all, chunked (no Content-Length)
            sent.append(1)
            yield b" " * (64 * 1024)

    r = client.post("/v1/cluster/members", content=chunks(), headers={"Content-Type": JSON})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large", r.text
    print(f"413 after {len(sent)} of 64 chunks of 64 KiB were produced")
