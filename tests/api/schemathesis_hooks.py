"""Schemathesis extensions for fuzzing paramstore (loaded through the
`hooks` key of schemathesis.toml, by tests/api/test_fuzz.py and by the CLI).

The schema says "binary" for tensor bodies; these draw well-formed files, so
that the fuzzer reaches the success paths, not only the parsers' refusals; and
`as_a_client_sends` makes hold what the schema states but cannot enforce
(docs/api.md lists these rules)."""

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from safetensors.numpy import save as save_safetensors

from store.dtypes import DTYPES

arrays = st.builds(
    lambda dtype, shape, seed: np.random.default_rng(seed).integers(-100, 100, size=shape).astype(dtype),
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.integers(0, 2**32),
)
tensor_names = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,15}\Z")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


schemathesis.openapi.media_type("application/x-npy", arrays.map(_npy))
schemathesis.openapi.media_type(
    "application/x-safetensors", st.dictionaries(tensor_names, arrays, min_size=1, max_size=3).map(save_safetensors)
)


@schemathesis.serializer("application/x-npy", "application/x-safetensors")
def as_bytes(ctx, value):
    return value if isinstance(value, bytes) else bytes(value)


@schemathesis.hook("map_case")
def as_a_client_sends(ctx, case):
    """- a raw body's size is X-Dtype x X-Shape: the headers describe the bytes;
    - a sparse push's safetensors file holds `indices` and `values`, one row each;
    - `if_match=checkpoint` goes with `mode=replace`.
    Positive cases only: negative ones stay as drawn."""
    if case.meta is not None and not case.meta.generation.mode.is_positive:
        return case
    body = case.body if isinstance(case.body, (bytes, bytearray)) else None
    if (
        case.media_type == "application/octet-stream"
        and body is not None
        and case.headers
        and case.headers.get("X-Dtype") in DTYPES
    ):
        values = np.frombuffer(bytes(body), dtype=np.uint8).astype(DTYPES[case.headers["X-Dtype"]])
        case.body = values.tobytes()
        case.headers["X-Shape"] = str(values.size)
    if case.path.endswith("/grad-rows") and body is not None:
        k = len(body) % 4
        case.body = save_safetensors(
            {"indices": np.arange(k, dtype=np.int64), "values": np.ones((k, 1), dtype=np.float32)}
        )
    if case.path == "/v1/checkpoint" and case.query and case.query.get("if_match") is not None:
        case.query["mode"] = "replace"
    return case
