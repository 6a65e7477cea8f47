"""Every command a shard's Raft log carries, and their one log encoding.

Commands are frozen dataclasses; `ShardState.apply` dispatches on their type.
In the log a command is a tuple of plain data, `(tag, field values in
declaration order)` with trailing defaults left out, sealed with a CRC32
(store/journal.py): pysyncobj pickles it, and the start-up journal check can
unpickle nothing but plain data. Positional tuples keep entries small: group
commit packs up to 48 KB of commands into one entry.

Tensor bytes travel beside a command as a blob field. The API puts the bytes
themselves there; `Store` replaces them with a `Ref` before proposing: `Inline`
(small payloads ride in the log) or `Stored` (a payload file named by its
SHA-256, sideloaded over the data path).

Adding a command: a frozen, keyword-only dataclass here with a unique `tag`
(payload fields marked with PAYLOAD), listed in `_TYPES`, and its handler in
`ShardState._HANDLERS` (tests/store/test_commands.py checks both). Append new
fields after the existing ones.

Journals written before this encoding (dict commands) are not readable; there
were no deployments to migrate.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

from .errors import Unprocessable
from .journal import seal

Buffer = Any  # bytes-like (bytes, memoryview, a numpy uint8 buffer): a payload not yet staged


@dataclass(frozen=True, slots=True)
class Inline:
    """Payload bytes carried in the command itself."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stored:
    """A payload in the shard's payload store, named by its SHA-256."""

    id: str
    size: int


Ref = Inline | Stored
Blob = Ref | Buffer
BlobPath = tuple[Any, ...]  # where a blob sits in a command: ("data",), ("state_arrays", "sum"), ("ops", 2, "data")

# How a field is written to the log (field metadata "kind"); unmarked fields are plain data.
_REF, _REFS, _CMDS, _TUPLE = "ref", "refs", "cmds", "tuple"
PAYLOAD = {"kind": _REF}  # field metadata of a payload: `data: Blob = field(metadata=PAYLOAD)`


class Command:
    """Base of every replicated command."""

    __slots__ = ()
    tag: ClassVar[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Put(Command):
    """Create or replace a tensor. None in the optional fields keeps what the
    existing tensor has (or the default on create)."""

    tag: ClassVar[str] = "put"
    name: str
    dtype: str
    shape: tuple[int, ...] = field(metadata={"kind": _TUPLE})
    data: Blob = field(metadata=PAYLOAD)
    rid: str | None = None
    if_match: int | Literal["*"] | None = None
    if_none_match: bool = False
    optimizer: dict[str, Any] | None = None
    allow_nonfinite: bool | None = None
    max_staleness: int | None = None
    staleness_policy: str | None = None
    # Optimizer state restored with the value (checkpoint restore); both None: none given.
    state_arrays: Mapping[str, Blob] | None = field(default=None, metadata={"kind": _REFS})
    state_scalars: Mapping[str, int] | None = None
    sync: dict[str, Any] | None = None  # synchronous rounds (store/sync_rounds.py); None keeps the existing


@dataclass(frozen=True, slots=True, kw_only=True)
class Grad(Command):
    """Apply a gradient with the tensor's optimizer."""

    tag: ClassVar[str] = "grad"
    name: str
    dtype: str
    shape: tuple[int, ...] = field(metadata={"kind": _TUPLE})
    data: Blob = field(metadata=PAYLOAD)
    rid: str | None = None
    base_version: int | None = None
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GradRows(Command):
    """Sparse gradient: `k` rows given by int64 `indices` and their `values`."""

    tag: ClassVar[str] = "grad_rows"
    name: str
    dtype: str
    row_shape: tuple[int, ...] = field(metadata={"kind": _TUPLE})
    k: int
    indices: Blob = field(metadata=PAYLOAD)
    values: Blob = field(metadata=PAYLOAD)
    rid: str | None = None
    base_version: int | None = None
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete(Command):
    tag: ClassVar[str] = "delete"
    name: str
    rid: str | None = None
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch(Command):
    """Several tensor commands of one shard, applied all or none."""

    tag: ClassVar[str] = "batch"
    ops: tuple[Put | Grad | Delete, ...] = field(metadata={"kind": _CMDS})
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Group(Command):
    """Independent commands sharing one Raft entry (group commit): each
    applies or fails on its own, with its own request id."""

    tag: ClassVar[str] = "group"
    cmds: tuple[Command, ...] = field(metadata={"kind": _CMDS})


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberSet(Command):
    """Record the addresses of a node hosting the shard (the address book)."""

    tag: ClassVar[str] = "member_set"
    id: str
    http: str
    raft: str
    data: str
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberDrop(Command):
    tag: ClassVar[str] = "member_drop"
    id: str
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableCreate(Command):
    """Create an embedding table's part on this shard (store/tables); `config`
    is the validated table config (`TableSpec.to_json()`)."""

    tag: ClassVar[str] = "table_create"
    name: str
    config: dict[str, Any]
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TablePush(Command):
    """Row gradients for the IDs of a table that live on this shard: `n` IDs
    (`id_dtype` int64 or uint64, little-endian) and n x dim float32 rows."""

    tag: ClassVar[str] = "table_push"
    name: str
    n: int
    id_dtype: str
    ids: Blob = field(metadata=PAYLOAD)
    grads: Blob = field(metadata=PAYLOAD)
    rid: str | None = None
    base_version: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableLoad(Command):
    """Restored rows (a checkpoint) for the IDs of a table that live on this
    shard: `n` >= 1 IDs (uint64 keys, little-endian) and their n records in
    the table's layout (store/tables/records.py: last-update version, row,
    optimizer state). The part's version becomes at least `version`, its step
    at least `step`. (One records blob: a payload is never empty, which the
    journal's plain-data check could not read back.)"""

    tag: ClassVar[str] = "table_load"
    name: str
    n: int
    ids: Blob = field(metadata=PAYLOAD)
    records: Blob = field(metadata=PAYLOAD)
    version: int = 0
    step: int = 0
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableDelete(Command):
    tag: ClassVar[str] = "table_delete"
    name: str
    rid: str | None = None
    if_match: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TableFence(Command):
    """The first step of a conditional (If-Match) table delete: fence this
    shard's part if it is at `version` (else 412), so that no push or load
    lands on it until the delete or `release=True` (the check failed on
    another shard) ends the fence."""

    tag: ClassVar[str] = "table_fence"
    name: str
    version: int = 0
    release: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutCreate(Command):
    """Create the layout record of a partitioned tensor in its home shard
    (store/partitions.py); its parts are created by their own Puts."""

    tag: ClassVar[str] = "layout_create"
    name: str
    dtype: str
    shape: tuple[int, ...] = field(metadata={"kind": _TUPLE})
    counts: tuple[int, ...] = field(metadata={"kind": _TUPLE})
    rid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundClose(Command):
    """Close the open synchronous rounds `(name, version)` with the gradients
    that arrived (round_timeout): proposed by the shard's leader when its
    timer fires, so every replica closes the same rounds at the same point of
    the log. A round already closed (or never opened) is left alone."""

    tag: ClassVar[str] = "round_close"
    rounds: tuple[tuple[str, int], ...] = field(metadata={"kind": _TUPLE})
    rid: str | None = None


@dataclass(frozen=True, slots=True)
class Noop(Command):
    """Changes nothing; a barrier for linearizable reads."""

    tag: ClassVar[str] = "noop"


TensorCommand = Put | Grad | GradRows | Delete | LayoutCreate
C = TypeVar("C", bound=Command)

_TYPES: dict[str, type[Command]] = {
    c.tag: c
    for c in (
        Put,
        Grad,
        GradRows,
        Delete,
        Batch,
        Group,
        MemberSet,
        MemberDrop,
        Noop,
        TableCreate,
        TablePush,
        TableDelete,
        TableFence,
        LayoutCreate,
        RoundClose,
        TableLoad,
    )
}
# per type: (field name, kind, default) in declaration order; and those with a kind
_FIELDS: dict[type[Command], tuple[tuple[str, str | None, Any], ...]] = {
    # `fields` is typed to take dataclasses; every Command type is one (mypy: arg-type)
    c: tuple((f.name, f.metadata.get("kind"), f.default) for f in fields(c))  # type: ignore[arg-type]
    for c in _TYPES.values()
}
_KINDED = {c: tuple(f for f in spec if f[1] is not None) for c, spec in _FIELDS.items()}


def _with(cmd: C, **changes: Any) -> C:
    """dataclasses.replace without its generality (a third of the cost: this
    is on every write's path)."""
    values = {name: getattr(cmd, name) for name, _, _ in _FIELDS[type(cmd)]}
    values.update(changes)
    return type(cmd)(**values)


def new_rid() -> str:
    return uuid.uuid4().hex


def with_rid(cmd: C) -> C:
    """`cmd` with a fresh request id if it takes one and has none: the one
    place request ids are defaulted. The state machine applies a request id
    at most once, so a command may safely be proposed again."""
    if isinstance(cmd, Group):
        return _with(cmd, cmds=tuple(with_rid(c) for c in cmd.cmds))
    if getattr(cmd, "rid", "") is None:
        return _with(cmd, rid=new_rid())
    return cmd


# ---- the log encoding ------------------------------------------------------------
def encode(cmd: Command) -> tuple[Any, ...]:
    """Plain data for the log. Raises TypeError for a blob that is not a Ref."""
    spec = _FIELDS[type(cmd)]
    values = [getattr(cmd, name) if kind is None else _encode_value(getattr(cmd, name), kind) for name, kind, _ in spec]
    n = len(values)
    while n and _is_default(getattr(cmd, spec[n - 1][0]), spec[n - 1][2]):
        n -= 1
    return (cmd.tag, *values[:n])


def decode(data: Any) -> Command:
    """The command `encode` made `data` from. Unprocessable for an unknown tag
    (a newer replica's command): every replica fails it the same way."""
    tag, *values = data
    cls = _TYPES.get(tag)
    if cls is None:
        raise Unprocessable(f"unknown command {tag!r}")
    spec = _FIELDS[cls]
    if len(values) > len(spec):
        raise Unprocessable(f"command {tag!r} has {len(values)} fields, at most {len(spec)} are known")
    return cls(
        **{
            name: v if kind is None else _decode_value(v, kind)
            for (name, kind, _), v in zip(spec, values, strict=False)
        }
    )


def to_log(cmd: Command) -> tuple[Any, ...]:
    """What is proposed to Raft: the encoded command, sealed."""
    return seal(encode(cmd))


def from_log(entry: tuple[Any, ...]) -> Command:
    """The command in a sealed log entry (the seal is checked at start-up)."""
    return decode(entry[1])


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _encode_value(v: Any, kind: str) -> Any:
    if v is None:
        return v
    if kind == _TUPLE:
        return tuple(v)
    if kind == _REF:
        return _encode_ref(v)
    if kind == _REFS:
        return {k: _encode_ref(r) for k, r in v.items()}
    return tuple(encode(c) for c in v)  # _CMDS


def _encode_ref(ref: Any) -> Any:
    if type(ref) is Inline:
        return ref.data
    if type(ref) is Stored:
        return (ref.id, ref.size)
    raise TypeError(f"a payload must be staged (Inline or Stored) before it is logged, not {type(ref).__name__}")


def _decode_value(v: Any, kind: str) -> Any:
    if v is None:
        return v
    if kind == _TUPLE:
        return tuple(v)
    if kind == _REF:
        return _decode_ref(v)
    if kind == _REFS:
        return {k: _decode_ref(r) for k, r in v.items()}
    return tuple(decode(c) for c in v)  # _CMDS


def _decode_ref(v: Any) -> Ref:
    return Inline(v) if type(v) is bytes else Stored(*v)


# ---- payload blobs -----------------------------------------------------------------
def blobs(cmd: Command) -> Iterator[tuple[BlobPath, Buffer]]:
    """Every payload of `cmd` (and of a batch's ops) not yet turned into a Ref."""
    for name, kind, _ in _KINDED[type(cmd)]:
        v = getattr(cmd, name)
        if v is None:
            continue
        if kind == _REF and not isinstance(v, (Inline, Stored)):
            yield (name,), v
        elif kind == _REFS:
            yield from (((name, k), b) for k, b in v.items() if not isinstance(b, (Inline, Stored)))
        elif kind == _CMDS:
            for i, c in enumerate(v):
                yield from (((name, i, *path), b) for path, b in blobs(c))


def with_refs(cmd: C, refs: Mapping[BlobPath, Ref]) -> C:
    """`cmd` with the blobs at the given paths replaced by their refs."""
    if not refs:
        return cmd
    changes: dict[str, Any] = {}
    for name, kind, _ in _KINDED[type(cmd)]:
        mine = {path[1:]: r for path, r in refs.items() if path[0] == name}
        if not mine:
            continue
        v = getattr(cmd, name)
        if kind == _REF:
            changes[name] = mine[()]
        elif kind == _REFS:
            changes[name] = {k: mine.get((k,), b) for k, b in v.items()}
        elif kind == _CMDS:
            changes[name] = tuple(
                with_refs(c, {p[1:]: r for p, r in mine.items() if p[0] == i}) for i, c in enumerate(v)
            )
    return _with(cmd, **changes)


def inline_bytes(cmd: Command) -> int:
    """Rough size of `cmd` in the log: its inline payloads (a batch's and a
    group's too) plus some overhead per command."""
    size = 256
    for name, kind, _ in _KINDED[type(cmd)]:
        v = getattr(cmd, name)
        if v is None:
            continue
        if kind == _REF:
            size += _ref_bytes(v)
        elif kind == _REFS:
            size += sum(_ref_bytes(r) for r in v.values())
        elif kind == _CMDS:
            size += sum(inline_bytes(c) for c in v)
    return size


def _ref_bytes(ref: Any) -> int:
    return len(ref.data) if isinstance(ref, Inline) else 0
