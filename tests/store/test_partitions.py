"""Partitioned tensors without a cluster: naming and placement, split and
assemble, the layout record in the state machine and its snapshot, and the
optimizers per part against the whole tensor."""

import numpy as np
import pytest

from store import dtypes, partitions
from store.commands import Delete, Grad, Inline, LayoutCreate, Put, decode, encode
from store.errors import AlreadyExists, PreconditionFailed, Unprocessable
from store.optimizers import apply_step, normalize_spec
from store.placement import shard_for
from store.snapshot import read_snapshot, write_snapshot
from store.state import ShardState


def resolve(ref):
    return ref.data


@pytest.mark.parametrize("dtype", sorted(dtypes.DTYPES))
@pytest.mark.parametrize(
    ("shape", "k"), [((10,), 3), ((7, 5), 4), ((13, 2, 3), 5), ((6, 4), 6), ((9,), 2), ((101, 3), 7)]
)
def test_split_then_assemble_gives_back_the_same_bytes(dtype, shape, k):
    rng = np.random.default_rng(len(shape) * 100 + k)
    arr = (rng.standard_normal(shape) * 1000).astype(dtypes.dtype_of(dtype))
    counts = partitions.row_counts(shape[0], k)
    assert len(counts) == k and sum(counts) == shape[0] and max(counts) - min(counts) <= 1
    parts = partitions.split(arr, counts)
    assert [p.shape[0] for p in parts] == list(counts)
    assert all(p.flags.c_contiguous and p.shape[1:] == arr.shape[1:] for p in parts)
    back = partitions.assemble([np.frombuffer(p.tobytes(), arr.dtype).reshape(p.shape) for p in parts])
    assert back.dtype == arr.dtype and back.tobytes() == arr.tobytes()
    assert partitions.bounds(counts)[-1][1] == shape[0]


def test_parts_are_placed_after_the_home_shard_by_their_name_alone():
    home = shard_for("emb", 5)
    assert [partitions.shard_of(partitions.part_name("emb", i), 5) for i in range(7)] == [
        (home + i) % 5 for i in range(7)
    ]
    assert partitions.shard_of("emb", 5) == home
    assert partitions.parse_part("a#p12") == ("a", 12)
    for not_a_part in ("a", "#p1", "a#p", "a#p01", "a#px"):
        assert partitions.parse_part(not_a_part) is None


@pytest.mark.parametrize(("k", "shape"), [(0, (10,)), (-1, (10,)), (11, (10,)), (300, (1000,)), (2, ())], ids=str)
def test_partition_counts_out_of_range_are_refused_with_the_limits(k, shape):
    with pytest.raises(Unprocessable) as err:
        partitions.check_partitions(k, shape, 256)
    assert err.value.extra["max_partitions"] == 256
    assert err.value.extra["rows"] == (shape[0] if shape else 0)
    assert "min(" in err.value.detail


def test_automatic_partitioning_takes_about_part_bytes_and_at_most_a_part_per_shard():
    mb = 1 << 20
    assert partitions.auto_partitions((1000,), 64 * mb, 4 * mb, 0, 8) == 1  # off
    assert partitions.auto_partitions((1000,), 3 * mb, 4 * mb, 2 * mb, 8) == 1  # ceil(3/4): one part
    assert partitions.auto_partitions((1000,), 9 * mb, 4 * mb, 2 * mb, 8) == 3
    assert partitions.auto_partitions((1000,), 64 * mb, 4 * mb, 2 * mb, 8) == 8  # one per shard
    assert partitions.auto_partitions((3, 1000), 64 * mb, 4 * mb, 2 * mb, 8) == 3  # one per row
    assert partitions.auto_partitions((), 64 * mb, 4 * mb, 2 * mb, 8) == 1


def layout_cmd(name="w", shape=(10, 2), counts=(4, 3, 3), **kw):
    return LayoutCreate(name=name, dtype="float32", shape=shape, counts=counts, **kw)


def test_the_layout_record_claims_the_name_survives_the_log_and_snapshots_and_is_deleted(tmp_path):
    s = ShardState(0)
    cmd = layout_cmd(rid="r1")
    assert decode(encode(cmd)) == cmd
    assert s.apply(cmd, resolve)["created"]
    assert s.apply(cmd, resolve)["duplicate"]  # a retry with the same id
    with pytest.raises(PreconditionFailed):
        s.apply(layout_cmd(), resolve)
    with pytest.raises(AlreadyExists):  # a whole tensor cannot take a partitioned tensor's name
        s.apply(Put(name="w", dtype="float32", shape=(10, 2), data=Inline(bytes(80))), resolve)
    s.apply(Put(name="v", dtype="float32", shape=(2,), data=Inline(bytes(8))), resolve)
    with pytest.raises(PreconditionFailed):  # nor the other way round
        s.apply(layout_cmd("v", (2,), (1, 1)), resolve)
    for counts in ((5, 6), (10,), (10, 0)):
        with pytest.raises(Unprocessable):
            s.apply(layout_cmd("x", (10, 2), counts), resolve)

    path = tmp_path / "snap.bin"
    write_snapshot(path, s.capture(), s.dedupe, 0, 7, {"layouts": [lay.to_json() for lay in s.layouts.values()]})
    loaded, _, _ = read_snapshot(path)
    assert loaded.layouts == s.layouts == {"w": partitions.Layout("w", "float32", (10, 2), (4, 3, 3))}

    assert s.apply(Delete(name="w"), resolve)["deleted"]
    assert "w" not in s.layouts


OPTIMIZERS = [
    {"type": "assign"},
    {"type": "sgd", "lr": 0.1},
    {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"type": "sgd", "lr": 0.05, "momentum": 0.8, "dampening": 0.1},
    {"type": "adam", "lr": 0.01, "weight_decay": 0.1},
    {"type": "adamw", "lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05},
    {"type": "adagrad", "lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1},
]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_optimizer_per_part_equals_the_whole_tensor_bit_for_bit(spec, dtype):
    """Every optimizer here is element-wise: each part, stepped with its
    slice of the gradient through the state machine, ends with exactly the
    bytes of the same slice of the whole tensor stepped whole."""
    rng = np.random.default_rng(7)
    dt = dtypes.dtype_of(dtype)
    shape, k = (23, 5), 4
    counts = partitions.row_counts(shape[0], k)
    init = rng.standard_normal(shape).astype(dt)
    whole = ShardState(0)
    cut = ShardState(1)
    norm = normalize_spec(spec)
    whole.apply(Put(name="w", dtype=dtype, shape=shape, data=Inline(init.tobytes()), optimizer=norm), resolve)
    for i, part in enumerate(partitions.split(init, counts)):
        cut.apply(
            Put(name=f"w#p{i}", dtype=dtype, shape=part.shape, data=Inline(part.tobytes()), optimizer=norm), resolve
        )
    for _ in range(5):
        g = rng.standard_normal(shape).astype(dt)
        whole.apply(Grad(name="w", dtype=dtype, shape=shape, data=Inline(g.tobytes())), resolve)
        for i, part in enumerate(partitions.split(g, counts)):
            cut.apply(Grad(name=f"w#p{i}", dtype=dtype, shape=part.shape, data=Inline(part.tobytes())), resolve)
    w = whole.get("w")
    got = partitions.assemble([cut.get(f"w#p{i}").value for i in range(k)])
    assert got.tobytes() == w.value.tobytes()
    assert not np.array_equal(w.value, init) or spec["type"] == "assign"
    for key, v in w.opt_state.items():
        if isinstance(v, np.ndarray):
            assert partitions.assemble([cut.get(f"w#p{i}").opt_state[key] for i in range(k)]).tobytes() == v.tobytes()
        else:
            assert all(cut.get(f"w#p{i}").opt_state[key] == v for i in range(k))


def test_apply_step_is_element_wise_for_every_float_rule():
    """The premise of the test above, on a single step outside the state machine."""
    rng = np.random.default_rng(3)
    p = rng.standard_normal((8, 3)).astype(np.float32)
    g = rng.standard_normal((8, 3)).astype(np.float32)
    for spec in OPTIMIZERS:
        norm = normalize_spec(spec)
        whole = apply_step(norm, {}, p, g).value
        parts = [
            apply_step(norm, {}, a, b).value for a, b in zip(np.split(p, [3, 5]), np.split(g, [3, 5]), strict=True)
        ]
        assert np.concatenate(parts).tobytes() == whole.tobytes()


@pytest.mark.parametrize("shards", [1, 3, 16])
def test_a_layouts_part_shards_are_where_each_part_name_is_placed(shards: int) -> None:
    lay = partitions.Layout("some.tensor", "float32", (40, 2), partitions.row_counts(40, 12))
    assert lay.part_shards(shards) == [
        partitions.shard_of(partitions.part_name(lay.name, i), shards) for i in range(12)
    ]
