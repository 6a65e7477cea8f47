import pytest

from store import membership
from store.commands import Batch, MemberDrop, MemberSet
from store.config import Address, NodeConfig
from store.errors import ConfigError, CorruptData, Unprocessable
from store.snapshot import read_snapshot, write_snapshot
from store.state import ShardState

N4 = {"id": "n4", "http": "127.0.0.4:7000", "raft": "127.0.0.4:7001", "data": "127.0.0.4:7003"}


def never(ref):
    raise AssertionError("member commands carry no payload")


def test_address_book_is_replicated_state_and_survives_a_snapshot(tmp_path):
    s = ShardState(1)
    s.apply(MemberSet(**N4, rid="a"), never)
    s.apply(MemberSet(**dict(N4, id="n5"), rid="b"), never)
    assert s.apply(MemberDrop(id="n5", rid="c"), never) == {"member": "n5", "dropped": True}
    assert s.members == {"n4": N4}
    path = tmp_path / "snap.bin"
    write_snapshot(path, s.tensors, s.dedupe, 1, 9, {"entries": [], "cluster": [], "members": s.members})
    loaded, _, _ = read_snapshot(path)
    assert loaded.members == {"n4": N4}


@pytest.mark.parametrize("node", [dict(N4, id=""), dict(N4, raft=None), dict(N4, http=7)])
def test_malformed_member_records_are_refused_and_change_nothing(node):
    s = ShardState(0)
    with pytest.raises(Unprocessable):
        s.apply(MemberSet(**node, rid="x"), never)
    assert s.members == {}


def test_member_commands_cannot_ride_in_a_batch():
    s = ShardState(0)
    with pytest.raises(Unprocessable, match="member_set cannot be part of a batch"):
        s.apply(Batch(ops=(MemberSet(**N4),), rid="y"), never)


def test_node_records_round_trip_and_bad_ones_name_the_field():
    node = membership.node_of(N4)
    assert node == NodeConfig("n4", Address("127.0.0.4", 7000), Address("127.0.0.4", 7001), Address("127.0.0.4", 7003))
    assert membership.record_of(node) == N4
    with pytest.raises(ConfigError, match=r"node\.raft"):
        membership.node_of(dict(N4, raft="nowhere"))
    with pytest.raises(ConfigError, match=r"node\.id"):
        membership.node_of(dict(N4, id="../n4"))


def test_membership_file_round_trip_and_corruption(tmp_path):
    f = membership.MembershipFile(tmp_path)
    assert not f.exists()
    f.save({0: ["b:2", "a:1"], 3: []})
    assert f.load() == {0: ["a:1", "b:2"], 3: []}
    f.path.write_text("{not json")
    with pytest.raises(CorruptData, match="--join"):
        f.load()
