"""The checker must catch real violations (hand-made histories)."""

from tests.faults.history import Op, check


def w(client, t0, t1, version, value, status="ok"):
    return Op(client, "write", "x", t0, t1, status, version, value)


def r(client, t0, t1, version, value, lin=True):
    return Op(client, "read", "x", t0, t1, "ok", version, value, linearizable=lin)


def test_a_good_history_passes():
    ops = [
        w(0, 0, 1, 1, 100),
        r(1, 1.5, 2, 1, 100),
        w(0, 2, 3, 2, 101),
        r(2, 2.5, 3.5, 2, 101),
        r(1, 2.1, 2.2, 1, 100),  # concurrent with the write of 2: may see 1
        w(3, 4, None, None, 555, status="unknown"),
    ]
    assert check(ops) == []


def test_stale_read_is_flagged():
    ops = [w(0, 0, 1, 1, 100), w(0, 1, 2, 2, 101), r(1, 3, 4, 1, 100)]
    assert any("stale read" in p for p in check(ops))


def test_non_linearizable_reads_are_not_held_to_real_time():
    ops = [w(0, 0, 1, 1, 100), w(0, 1, 2, 2, 101), r(1, 3, 4, 1, 100, lin=False)]
    assert check(ops) == []


def test_read_of_a_value_never_written_is_flagged():
    assert any("no write produced" in p for p in check([w(0, 0, 1, 1, 100), r(1, 2, 3, 7, 999)]))


def test_duplicate_versions_and_double_apply_are_flagged():
    assert any("two acknowledged" in p for p in check([w(0, 0, 1, 1, 100), w(1, 0, 1, 1, 200)]))
    ops = [w(0, 0, 1, 1, 100), w(1, 1, 9, None, 300, status="unknown"), r(2, 2, 3, 2, 300), r(2, 4, 5, 3, 300)]
    assert any("applied twice" in p for p in check(ops))


def test_read_from_the_future_is_flagged():
    assert any("invoked later" in p for p in check([w(0, 5, 6, 1, 100), r(1, 0, 1, 1, 100)]))


def test_unknown_write_may_appear_once():
    ops = [w(0, 0, 1, 1, 100), w(1, 1, None, None, 300, status="unknown"), r(2, 5, 6, 2, 300)]
    assert check(ops) == []
