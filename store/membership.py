"""Which shards a replica hosts and who its peers are, once membership can change.

`[[nodes]]` in the config is only the *bootstrap* membership: the first start
of a data dir records, in `membership.json`, the shards this node hosts and
the peers each shard started with. Later starts read that file, never the
node list, so an edited config cannot silently re-place shards. From there on
pysyncobj owns each shard's voting members (journal + snapshot), and each
shard's state keeps an address book (id -> http/raft/data addresses) of the
nodes added at run time.

A replica that joins a running cluster (`paramstore serve --join URL`) gets a
`JoinPlan`: for each shard, its current members and the leader's data path,
from which it downloads a fresh snapshot before its Raft replica starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Address, NodeConfig
from .errors import ConfigError, CorruptData

FILE_NAME = "membership.json"


def record_of(node: NodeConfig) -> dict[str, str]:
    return {"id": node.id, "http": str(node.http), "raft": str(node.raft), "data": str(node.data)}


def node_of(record: Mapping[str, Any]) -> NodeConfig:
    """A NodeConfig from an address-book record or an API request body."""
    if not isinstance(record, Mapping):
        raise ConfigError("node: expected an object with id, http, raft and data")
    node_id = record.get("id")
    if (
        not isinstance(node_id, str)
        or not node_id
        or len(node_id) > 64
        or not all(c.isalnum() or c in "-_." for c in node_id)
    ):
        raise ConfigError(f"node.id: expected 1-64 letters, digits, '-', '_' or '.', got {node_id!r}")
    return NodeConfig(node_id, *(Address.parse(record.get(k), f"node.{k}") for k in ("http", "raft", "data")))


@dataclass(frozen=True)
class JoinPlan:
    """What a joining replica needs before it starts: per shard, the current
    members (their addresses) and where to download a snapshot from."""

    shards: Mapping[int, tuple[NodeConfig, ...]]
    snapshot_sources: Mapping[int, NodeConfig]


class MembershipFile:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[int, list[str]]:
        """shard -> raft addresses of the peers it was bootstrapped with."""
        try:
            doc = json.loads(self.path.read_text())
            return {int(k): [str(a) for a in v] for k, v in doc["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptData(
                f"{self.path} is unreadable ({e}); restore it or move the data dir "
                "away and re-add this node with `paramstore serve --join`"
            ) from None

    def save(self, shards: Mapping[int, Iterable[str]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": 1, "shards": {str(k): sorted(v) for k, v in shards.items()}}, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
