"""The served OpenAPI document and the answers it promises (the fuzzer in
test_fuzz.py checks them against generated requests; these pin the parts it
cannot reach or that must hold exactly)."""

import numpy as np
import pytest

RAW = "application/octet-stream"
ST = "application/x-safetensors"


@pytest.fixture(scope="module")
def doc(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_one_error_schema_and_no_fastapi_validation_schema(doc):
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["Error"]["required"] == ["error", "detail"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (
                        method,
                        path,
                        status,
                    )


def test_tensor_routes_declare_bodies_headers_and_media_types(doc):
    put = doc["paths"]["/v1/tensors/{name}"]["put"]
    assert set(put["requestBody"]["content"]) == {RAW, "application/x-npy", "application/json"}
    headers = {p["name"] for p in put["parameters"] if p["in"] == "header"}
    assert {"X-Dtype", "X-Shape", "If-Match", "If-None-Match", "X-Optimizer", "X-Request-Id"} <= headers
    get = doc["paths"]["/v1/tensors/{name}"]["get"]
    assert set(get["responses"]["200"]["content"]) == {RAW, "application/x-npy", "application/json", ST}
    assert {"304", "404", "406", "408"} <= set(get["responses"])
    batch = doc["paths"]["/v1/tensors:batch"]["get"]
    assert set(batch["responses"]["200"]["content"]) == {"application/x-safetensors"}
    names = next(p for p in batch["parameters"] if p["name"] == "names")
    assert names["schema"]["pattern"].startswith("^")
    assert set(doc["paths"]["/v1/checkpoint"]["get"]["responses"]["200"]["content"]) == {"application/x-safetensors"}
    members = doc["paths"]["/v1/cluster/members"]["post"]
    assert members["requestBody"]["content"]["application/json"]["schema"]["required"] == ["id", "http", "raft", "data"]


def test_wire_dtypes_are_documented(doc):
    """X-Wire-Dtype on every read that takes it, and narrowed gradient bodies (issue 14)."""
    paths = doc["paths"]
    for path, method in (
        ("/v1/tensors/{name}", "get"),
        ("/v1/tensors/{name}", "head"),
        ("/v1/tensors:batch", "get"),
        ("/v1/tables/{name}:lookup", "post"),
    ):
        wire = next(p for p in paths[path][method]["parameters"] if p["name"] == "X-Wire-Dtype")
        assert wire["in"] == "header" and wire["schema"]["enum"] == ["float16", "bfloat16", "int8"], path
    assert "X-Wire-Dtype" in paths["/v1/tensors/{name}"]["get"]["responses"]["200"]["headers"]
    grad = paths["/v1/tensors/{name}/grad"]["post"]
    assert ST in grad["requestBody"]["content"]
    dtype = next(p for p in grad["parameters"] if p["name"] == "X-Dtype")
    assert {"float16", "bfloat16", "float32"} <= set(dtype["schema"]["enum"])


def test_query_validation_is_a_400_with_the_error_body(client):
    r = client.get("/v1/tensors:batch", params={"names": ",,"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = client.get("/v1/tensors/x", params={"rows": "1;2"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_405_lists_every_method_of_the_path(client):
    r = client.request("OPTIONS", "/v1/tensors/some-name")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    assert r.json()["error"] == "method_not_allowed"


def test_a_callers_wait_that_runs_out_is_408_not_503(client):
    client.put(
        "/v1/tensors/wait408",
        content=np.zeros(2, np.float32).tobytes(),
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "2"},
    )
    r = client.get("/v1/tensors/wait408", params={"min_version": 5, "timeout": 0.05})
    assert r.status_code == 408 and r.json()["error"] == "wait_timeout", r.text
    assert "retry-after" not in r.headers
    r = client.get("/v1/checkpoint", params={"timeout": 0})
    assert r.status_code == 408 and r.json()["error"] == "wait_timeout", r.text
    assert client.get("/v1/checkpoint").status_code == 200  # the server's own deadline: fine


@pytest.mark.parametrize("header", ["If-Match", "X-Max-Staleness"])
def test_non_ascii_digits_in_headers_are_400_not_500(client, header):
    r = client.put(
        "/v1/tensors/digits",
        content=b"\0" * 4,
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1", header: b"\xb2"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text


def test_optimizer_type_that_is_not_a_string_is_422(client):
    r = client.put(
        "/v1/tensors/opt",
        content=b"\0" * 4,
        headers={"Content-Type": RAW, "X-Dtype": "float32", "X-Shape": "1", "X-Optimizer": '{"type": {}}'},
    )
    assert r.status_code == 422 and r.json()["error"] == "unprocessable", r.text


def test_raw_gradient_without_dtype_for_an_unknown_tensor_is_404(client):
    r = client.post("/v1/tensors/never-created/grad", content=b"\0" * 4, headers={"Content-Type": RAW})
    assert r.status_code == 404 and r.json()["error"] == "not_found", r.text


def test_json_values_outside_the_dtype_range_are_refused(client):
    response = client.put("/v1/tensors/overflow16", json={"dtype": "float16", "data": [1e10]})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "unprocessable"
    assert client.get("/v1/tensors/overflow16").status_code == 404
