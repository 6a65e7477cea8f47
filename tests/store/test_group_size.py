from store.commands import Batch, Grad, Inline
from store.raft import GROUP_MAX_BYTES, _inline_bytes


def test_group_size_counts_the_inline_blobs_of_a_batchs_ops():
    op = Grad(name="w", dtype="float32", shape=(2500,), data=Inline(b"x" * 10_000))
    single = _inline_bytes(op)
    batch = _inline_bytes(Batch(rid="r", ops=(op,) * 8))
    assert single >= 10_000
    assert batch >= 8 * 10_000 > GROUP_MAX_BYTES  # so it goes into an entry of its own
