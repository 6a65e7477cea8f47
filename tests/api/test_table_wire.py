"""Table request and response bodies: safetensors, npy, JSON; bad bodies are 4xx."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import safetensors
import torch
from safetensors.numpy import save
from safetensors.torch import load as load_torch
from safetensors.torch import save as save_torch

from api import table_wire as tw
from api.errors import NotAcceptable, UnsupportedMediaType
from store.errors import InvalidRequest, Unprocessable
from store.tables import rowdtype


def npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


def test_lookup_bodies() -> None:
    ids = np.array([5, -1, 2**40], dtype=np.int64)
    assert tw.decode_lookup(tw.SAFETENSORS, save({"ids": ids})).tolist() == ids.tolist()
    assert tw.decode_lookup(tw.NPY, npy(ids)).tolist() == ids.tolist()
    assert tw.decode_lookup("application/json; charset=utf-8", b'{"ids": [5, -1]}').tolist() == [5, -1]
    u = np.array([2**64 - 1], dtype=np.uint64)
    assert tw.decode_lookup(tw.SAFETENSORS, save({"ids": u})).dtype == np.uint64


@pytest.mark.parametrize(
    "ctype,body,err",
    [
        (tw.SAFETENSORS, save({"ids": np.array([1.0, 2.0])}), Unprocessable),
        (tw.SAFETENSORS, save({"ids": np.ones((2, 2), np.int64)}), Unprocessable),
        (tw.SAFETENSORS, save({"idz": np.ones(2, np.int64)}), Unprocessable),
        (tw.SAFETENSORS, b"garbage", InvalidRequest),
        (tw.NPY, npy(np.array([1.5])), Unprocessable),
        (tw.NPY, b"\x93NUMPY garbage", InvalidRequest),
        (tw.JSON, b'{"ids": [1.5]}', Unprocessable),
        (tw.JSON, b'{"ids": [1], "x": 1}', InvalidRequest),
        (tw.JSON, b"[1, 2]", InvalidRequest),
        ("text/plain", b"1,2", UnsupportedMediaType),
    ],
)
def test_bad_lookup_bodies(ctype: str, body: bytes, err: type) -> None:
    with pytest.raises(err):
        tw.decode_lookup(ctype, body)


def test_npy_object_arrays_are_refused_without_unpickling() -> None:
    out = io.BytesIO()
    np.save(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(Unprocessable):
        tw.decode_lookup(tw.NPY, out.getvalue())


def test_push_bodies() -> None:
    ids = np.array([3, 3, 7], dtype=np.int64)
    g = np.arange(6, dtype=np.float32).reshape(3, 2)
    got_ids, got = tw.decode_push(tw.SAFETENSORS, save({"ids": ids, "grads": g}))
    assert got_ids.tolist() == [3, 3, 7] and np.array_equal(got, g)
    bf = torch.from_numpy(g).to(torch.bfloat16)
    st = save_torch({"ids": torch.from_numpy(ids), "grads": bf})
    assert np.array_equal(tw.decode_push(tw.SAFETENSORS, st)[1], bf.float().numpy())
    ids2, g2 = tw.decode_push(tw.JSON, json.dumps({"ids": [1, 2], "grads": [[1, 2], [3, 4]]}).encode())
    assert ids2.tolist() == [1, 2] and g2.dtype == np.float32 and g2.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    "ctype,body,err",
    [
        (tw.SAFETENSORS, save({"ids": np.ones(2, np.int64)}), Unprocessable),
        (tw.SAFETENSORS, save({"ids": np.ones(2, np.int64), "grads": np.ones((2, 2), np.int32)}), Unprocessable),
        (tw.SAFETENSORS, save({"ids": np.ones(2, np.int64), "grads": np.ones(4, np.float32)}), Unprocessable),
        (tw.JSON, b'{"ids": [1, 2], "grads": [[1], [2, 3]]}', Unprocessable),
        (tw.JSON, b'{"ids": [1], "grads": [["x"]]}', Unprocessable),
        (tw.JSON, b'{"ids": [1]}', InvalidRequest),
        (tw.NPY, npy(np.ones(2, np.int64)), UnsupportedMediaType),
    ],
)
def test_bad_push_bodies(ctype: str, body: bytes, err: type) -> None:
    with pytest.raises(err):
        tw.decode_push(ctype, body)


def test_row_responses() -> None:
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    st = dict(safetensors.deserialize(tw.encode_rows(tw.SAFETENSORS, rows, "float32", {"version": "4"})))
    assert st["rows"]["dtype"] == "F32" and np.frombuffer(st["rows"]["data"], np.float32).tolist() == list(range(6))
    assert (
        np.load(io.BytesIO(tw.encode_rows(tw.NPY, rows, "float32", {})), allow_pickle=False).tolist() == rows.tolist()
    )
    bf = rowdtype.encode(rows, "bfloat16")
    back = load_torch(tw.encode_rows(tw.SAFETENSORS, bf, "bfloat16", {}))["rows"]
    assert back.dtype == torch.bfloat16 and back.float().numpy().tolist() == rows.tolist()
    assert json.loads(tw.encode_rows(tw.JSON, bf, "bfloat16", {"version": "1"})) == {
        "rows": rows.tolist(),
        "version": "1",
    }


def test_negotiate() -> None:
    assert tw.negotiate(None) == tw.SAFETENSORS
    assert tw.negotiate("application/json") == tw.JSON
    assert tw.negotiate("application/x-npy;q=0.5, application/json;q=0.9") == tw.JSON
    assert tw.negotiate("*/*") == tw.SAFETENSORS
    with pytest.raises(NotAcceptable):
        tw.negotiate("text/csv")
