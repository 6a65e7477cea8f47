"""store/record.py: the tensor record's one serialization (metadata + arrays),
and store/dtypes.py's one dtype table."""

import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from store import dtypes, record
from store.errors import Unprocessable
from store.record import Tensor


def make(dtype: str, shape: tuple[int, ...]) -> Tensor:
    value = (np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 1.5).astype(dtypes.DTYPES[dtype])
    state = {"step": np.int64(3), "exp_avg": value * 2} if dtype in dtypes.FLOAT_DTYPES else {}
    return Tensor(
        name=f"t.{dtype}",
        dtype=dtype,
        shape=shape,
        value=value,
        version=5,
        optimizer={"type": "adam", "lr": 0.1} if state else {"type": "assign"},
        opt_state=state,
        allow_nonfinite=True,
        max_staleness=2,
        staleness_policy="scale",
    )


@pytest.mark.parametrize("dtype", list(dtypes.DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 4)])
def test_round_trip_every_dtype(dtype, shape):
    t = make(dtype, shape)
    meta = json.loads(json.dumps(record.metadata(t)))  # JSON-able, np scalars included
    arrays = {k: np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape) for k, a in record.arrays(t).items()}
    back = record.from_metadata(meta, arrays)
    for f in ("name", "dtype", "shape", "version", "optimizer", "allow_nonfinite", "max_staleness", "staleness_policy"):
        assert getattr(back, f) == getattr(t, f), f
    assert back.value.dtype == dtypes.DTYPES[dtype] and back.value.tobytes() == t.value.tobytes()
    assert back.opt_state.keys() == t.opt_state.keys()
    for k, v in t.opt_state.items():
        assert np.array_equal(back.opt_state[k], v)


def test_without_state_and_from_a_plain_file():
    t = make("float32", (2,))
    meta = record.metadata(t, state=False)
    assert meta["state_arrays"] == [] and meta["state_scalars"] == {}
    assert list(record.arrays(t, state=False)) == [record.VALUE]
    plain = record.from_metadata({"name": "w"}, {record.VALUE: np.zeros(3, np.int32)})
    assert (plain.dtype, plain.shape, plain.optimizer, plain.staleness_policy, plain.allow_nonfinite) == (
        "int32",
        (3,),
        {"type": "assign"},
        "reject",
        False,
    )


def test_the_listing_shows_the_same_fields_as_before():
    t = make("float16", (2, 2))
    assert t.describe(4) == {
        "name": "t.float16",
        "dtype": "float16",
        "shape": [2, 2],
        "version": 5,
        "shard": 4,
        "optimizer": {"type": "adam", "lr": 0.1},
        "nbytes": 8,
        "allow_nonfinite": True,
        "max_staleness": 2,
        "staleness_policy": "scale",
    }


def test_records_are_built_by_keyword():
    with pytest.raises(TypeError):
        Tensor("w", "float32", (1,), np.zeros(1, np.float32), 1, {"type": "assign"})  # type: ignore[misc]  # positional: must fail


@pytest.mark.parametrize("dtype", list(dtypes.DTYPES))
def test_the_dtype_table_matches_safetensors(dtype):
    arr = np.zeros(2, dtypes.DTYPES[dtype])
    blob = save({"x": arr})
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    assert header["x"]["dtype"] == dtypes.SAFETENSORS[dtype]
    assert dtypes.from_safetensors(dtypes.SAFETENSORS[dtype], "x") == dtype
    assert load(save({"x": arr}))["x"].dtype == dtypes.DTYPES[dtype]


def test_unsupported_safetensors_dtypes_are_refused():
    with pytest.raises(Unprocessable, match="BF16 is not supported"):
        dtypes.from_safetensors("BF16", "tensor 'w'")
