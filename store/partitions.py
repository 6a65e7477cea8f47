"""Partitioned tensors: a tensor cut into K row ranges of its first dimension
(a 1-D tensor by elements), each an ordinary tensor record `<name>#p<i>` in
its own shard, and a small layout record under `<name>` in the home shard.

Pure functions only (no Raft, no network): naming, placement, row ranges,
splitting and assembling, the layout record and its checks.

Part i lives in shard `(home + i) mod S`, where home = shard_for(name): the
shard is a function of the part's name alone, so every replica and client
places parts the same way, and consecutive shards start on consecutive nodes
(store/placement.py), so the parts' replicas and leaders spread over nodes.
'#' is not allowed in tensor names (api/headers.py), so a part's name never
clashes with a tensor's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import dtypes, placement
from .errors import Unprocessable

if TYPE_CHECKING:
    from .record import Tensor

SEP = "#p"


def part_name(name: str, i: int) -> str:
    return f"{name}{SEP}{i}"


def parse_part(name: str) -> tuple[str, int] | None:
    """(tensor name, part index) of a part's name, else None."""
    base, sep, index = name.rpartition(SEP)
    if not sep or not base or not index.isdigit() or index != str(int(index)):
        return None
    return base, int(index)


def shard_of(name: str, shards: int) -> int:
    """The shard of a tensor or of a part (placed after its tensor's home)."""
    part = parse_part(name)
    if part is None:
        return placement.shard_for(name, shards)
    base, i = part
    return (placement.shard_for(base, shards) + i) % shards


def row_counts(rows: int, k: int) -> tuple[int, ...]:
    """K row counts summing to `rows`; the first `rows % k` parts take one more."""
    q, r = divmod(rows, k)
    return tuple(q + 1 if i < r else q for i in range(k))


def bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) row range of each part."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def split(arr: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Views of `arr` (rank >= 1) along dim 0; C-contiguous if `arr` is."""
    return [arr[a:b] for a, b in bounds(counts)]


def assemble(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0)


def check_partitions(k: int, shape: Sequence[int], maximum: int) -> None:
    """422 with the limits for a K this tensor cannot be cut into."""
    rows = shape[0] if shape else 0
    top = min(rows, maximum)
    if not 1 <= k <= top:
        raise Unprocessable(
            f"X-Partitions: {k} is out of range: 1 <= partitions <= min(rows, limits.max_partitions) = "
            f"min({rows}, {maximum}) = {top}" + (" (a scalar cannot be partitioned)" if not shape else ""),
            partitions=k,
            rows=rows,
            max_partitions=maximum,
        )


def auto_partitions(shape: Sequence[int], nbytes: int, part_bytes: int, above: int, shards: int) -> int:
    """How many parts the store picks when the client names none: 1 (whole)
    up to `above` bytes (0: never partition), else parts of about `part_bytes`,
    at most one per shard and one per row."""
    if above <= 0 or nbytes <= above or not shape or part_bytes <= 0:
        return 1
    return max(1, min(math.ceil(nbytes / part_bytes), shards, shape[0]))


@dataclass(frozen=True)
class Layout:
    """The layout record: what the tensor is and how it is cut (immutable
    while the tensor exists; repartitioning is checkpoint-and-reload)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    counts: tuple[int, ...]  # rows of each part

    @property
    def k(self) -> int:
        return len(self.counts)

    def parts(self) -> list[str]:
        return [part_name(self.name, i) for i in range(self.k)]

    def part_shape(self, i: int) -> tuple[int, ...]:
        return (self.counts[i], *self.shape[1:])

    def part_shards(self, shards: int) -> list[int]:
        """`shard_of` each part: its tensor's home shard hashed once, not once per part."""
        home = placement.shard_for(self.name, shards)
        return [(home + i) % shards for i in range(self.k)]

    def describe(self, shards: int, versions: Sequence[int | None] | None = None) -> list[dict[str, Any]]:
        """Each part's shard and [start, stop) row range (and version, if known)."""
        out: list[dict[str, Any]] = []
        for i, ((a, b), shard) in enumerate(zip(bounds(self.counts), self.part_shards(shards), strict=True)):
            d: dict[str, Any] = {"part": i, "shard": shard, "rows": [a, b]}
            if versions is not None:
                d["version"] = versions[i]
            out.append(d)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["counts"]))


def describe_partitioned(lay: Layout, parts: dict[int, Tensor], shards: int) -> dict[str, Any]:
    """The tensor listing's entry of a partitioned tensor: its home shard,
    the whole dtype and shape, the version vector (None for a part not
    hosted here) and its minimum, and each part's shard and row range."""
    versions = [parts[i].version if i in parts else None for i in range(lay.k)]
    known = [v for v in versions if v is not None]
    first = parts.get(0)
    entry = first.describe(0) if first is not None else {}
    entry.update(
        name=lay.name,
        dtype=lay.dtype,
        shape=list(lay.shape),
        version=min(known) if len(known) == lay.k else None,
        versions=versions,
        shard=placement.shard_for(lay.name, shards),
        nbytes=math.prod(lay.shape) * dtypes.dtype_of(lay.dtype).itemsize,
        partitions=lay.describe(shards),
    )
    return entry
