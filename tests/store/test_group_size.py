from store.raft import GROUP_MAX_BYTES, _inline_bytes


def test_group_size_counts_the_inline_blobs_of_a_batchs_ops():
    op = {"op": "grad", "name": "w", "data": {"inline": b"x" * 10_000}}
    single = _inline_bytes(op)
    batch = _inline_bytes({"op": "batch", "rid": "r", "ops": [op] * 8})
    assert single >= 10_000
    assert batch >= 8 * 10_000 > GROUP_MAX_BYTES  # so it goes into an entry of its own
