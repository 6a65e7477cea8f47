"""store/commands.py: every command's log encoding, payload staging, request ids,
and the state machine's dispatch on command types."""

import pickle
from dataclasses import fields

import pytest

from store import commands
from store.commands import (
    Batch,
    Command,
    Delete,
    Grad,
    GradRows,
    Group,
    Inline,
    LayoutCreate,
    MemberDrop,
    MemberSet,
    Noop,
    Put,
    RoundClose,
    Stored,
    TableCreate,
    TableDelete,
    TableFence,
    TableLoad,
    TablePush,
    decode,
    encode,
    from_log,
    to_log,
)
from store.errors import Unprocessable
from store.journal import content_crc, plain_loads
from store.state import ShardState

SHA = "ab" * 32
EVERY = [
    Put(
        name="w",
        dtype="float32",
        shape=(2, 3),
        data=Inline(b"\0" * 24),
        rid="r1",
        if_match="*",
        if_none_match=True,
        optimizer={"type": "adam", "lr": 0.1, "betas": (0.9, 0.99)},
        allow_nonfinite=True,
        max_staleness=4,
        staleness_policy="scale",
        state_arrays={"exp_avg": Stored(SHA, 24)},
        state_scalars={"step": 7},
    ),
    Put(name="w", dtype="float32", shape=(), data=Stored(SHA, 4)),
    Grad(name="w", dtype="float16", shape=(3,), data=Inline(b"\1" * 6), rid="r2", base_version=3, if_match=4),
    GradRows(
        name="emb",
        dtype="float32",
        row_shape=(4,),
        k=2,
        indices=Inline(b"\0" * 16),
        values=Stored(SHA, 32),
        rid="r3",
        base_version=1,
        if_match=2,
    ),
    Delete(name="w", rid="r4", if_match=9),
    Batch(
        ops=(
            Grad(name="a", dtype="int32", shape=(1,), data=Inline(b"\0" * 4)),
            Delete(name="b"),
            Put(name="c", dtype="int64", shape=(1,), data=Inline(b"\0" * 8)),
        ),
        rid="r5",
    ),
    Group(cmds=(Noop(), Delete(name="x", rid="r6"), MemberDrop(id="n3", rid="r7"))),
    MemberSet(id="n4", http="h:1", raft="r:2", data="d:3", rid="r8"),
    MemberDrop(id="n4"),
    Noop(),
    TableCreate(name="emb", config={"dim": 4, "optimizer": {"type": "ftrl", "lr": 0.1}}, rid="r9"),
    TablePush(
        name="emb", n=2, id_dtype="uint64", ids=Inline(b"\0" * 16), grads=Stored(SHA, 32), rid="r10", base_version=3
    ),
    TableDelete(name="emb", rid="r11", if_match=5),
    TableFence(name="emb", version=4),
    TableFence(name="emb", release=True),
    LayoutCreate(name="big", dtype="float32", shape=(10, 4), counts=(4, 3, 3), rid="r12"),
    Put(name="s", dtype="float32", shape=(2,), data=Inline(b"\0" * 8), sync={"workers": 3, "backup_workers": 1}),
    RoundClose(rounds=(("s", 4), ("t", 9)), rid="r13"),
    TableLoad(
        name="emb",
        n=1,
        ids=Inline(b"\0" * 8),
        records=Stored(SHA, 24),
        version=7,
        step=3,
        rid="r14",
    ),
]


def test_every_command_type_is_covered_here_and_by_the_state_machine():
    assert {type(c) for c in EVERY} == set(commands._TYPES.values())
    assert set(ShardState._HANDLERS) == set(commands._TYPES.values())


@pytest.mark.parametrize("cmd", EVERY, ids=lambda c: c.tag)
def test_round_trip_through_the_log(cmd):
    entry = to_log(cmd)
    logged = pickle.dumps(((1, (entry,))), 2)  # what pysyncobj writes for our replicated call
    _, (back,) = plain_loads(logged)  # what the journal check can read: plain data only
    assert content_crc(back[1]) == back[0]
    assert from_log(back) == cmd == decode(encode(cmd))


def test_defaults_are_left_out_of_the_log():
    assert encode(Delete(name="w")) == ("delete", "w")
    assert encode(Noop()) == ("noop",)
    assert encode(Grad(name="w", dtype="float32", shape=[2], data=Stored(SHA, 8), rid="r")) == (
        "grad",
        "w",
        "float32",
        (2,),
        (SHA, 8),
        "r",
    )


def test_a_command_costs_the_log_little_beyond_its_payload():
    def logged(data: bytes) -> int:
        cmd = Grad(name="layer3.weight", dtype="float32", shape=(256,), data=Inline(data), rid=commands.new_rid())
        return len(pickle.dumps((1, (to_log(cmd),)), 2))

    assert logged(b"") < 160  # the dict commands this encoding replaced took 260
    assert 1024 <= logged(b"x" * 1024) - logged(b"") <= 1024 + 32  # ASCII bytes: one byte each


def test_unstaged_payloads_cannot_be_logged():
    with pytest.raises(TypeError, match="staged"):
        to_log(Grad(name="w", dtype="float32", shape=(1,), data=b"\0" * 4))


def test_unknown_tags_and_extra_fields_are_refused():
    with pytest.raises(Unprocessable, match="unknown command 'resize'"):
        decode(("resize", "w"))
    with pytest.raises(Unprocessable, match="fields"):
        decode(("noop", 1))


def test_blobs_and_refs_reach_every_payload_of_a_batch_and_a_restore():
    raw = memoryview(b"\1" * 8)
    put = Put(
        name="c", dtype="float32", shape=(2,), data=raw, state_arrays={"sum": b"\2" * 8}, optimizer={"type": "adagrad"}
    )
    batch = Batch(ops=(Delete(name="a"), Grad(name="b", dtype="float32", shape=(2,), data=b"\3" * 8), put))
    found = dict(commands.blobs(batch))
    assert set(found) == {("ops", 1, "data"), ("ops", 2, "data"), ("ops", 2, "state_arrays", "sum")}
    refs = {path: Inline(bytes(b)) for path, b in found.items()}
    staged = commands.with_refs(batch, refs)
    assert not list(commands.blobs(staged))
    assert staged.ops[2].state_arrays == {"sum": Inline(b"\2" * 8)} and staged.ops[1].data == Inline(b"\3" * 8)
    assert batch.ops[1].data == b"\3" * 8  # frozen: the original is unchanged
    assert decode(encode(staged)) == staged


def test_request_ids_are_defaulted_once_and_kept_when_given():
    given = Delete(name="w", rid="mine")
    assert commands.with_rid(given) is given
    fresh = commands.with_rid(Delete(name="w"))
    assert len(fresh.rid) == 32 and commands.with_rid(Delete(name="w")).rid != fresh.rid
    group = commands.with_rid(Group(cmds=(Delete(name="w"), Noop())))
    assert group.cmds[0].rid and group.cmds[1] == Noop()
    assert commands.with_rid(Noop()) == Noop()


def test_commands_are_immutable_and_keyword_only():
    cmd = Delete(name="w")
    with pytest.raises(AttributeError):
        cmd.name = "v"
    with pytest.raises(TypeError):
        Delete("w")  # type: ignore[misc]  # the positional call this test expects to fail
    assert all(f.kw_only for f in fields(Grad))


def test_dispatch_is_on_type():
    class Resize(Command):
        tag = "resize"

    s = ShardState(0)
    with pytest.raises(Unprocessable, match="unknown command Resize"):
        s.apply(Resize(), lambda ref: b"")
    assert s.apply(Noop(), lambda ref: b"") == {}
    put = Put(name="w", dtype="float32", shape=(1,), data=Inline(b"\0" * 4), rid="p")
    assert s.apply(put, lambda ref: ref.data)["created"]
    assert s.apply(put, lambda ref: ref.data)["duplicate"]  # the request id is recorded
