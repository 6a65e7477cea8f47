"""One typed configuration object, loaded from a TOML file, then environment
variables, then command-line overrides (each later source wins).

A wrong value fails at start with a `ConfigError` naming the field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import content_id
from .errors import ConfigError

ENV_PREFIX = "PARAMSTORE_"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: object, where: str) -> Address:
        if not isinstance(text, str) or ":" not in text:
            raise ConfigError(f"{where}: expected 'host:port', got {text!r}")
        host, _, port_text = text.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{where}: port {port_text!r} is not a number") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"{where}: expected 'host:port' with a port in 1..65535, got {text!r}")
        return cls(host, port)

    def with_port(self, port: int) -> Address:
        return Address(self.host, port)

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeConfig:
    id: str
    http: Address
    raft: Address  # shard k listens on raft.port + k
    data: Address  # payload data path between replicas

    def raft_address(self, shard: int) -> Address:
        return self.raft.with_port(self.raft.port + shard)

    @property
    def url(self) -> str:
        return f"http://{self.http}"


@dataclass(frozen=True)
class RaftSettings:
    """pysyncobj timers and limits; docs/architecture.md explains each default."""

    # the tick thread's idle poll timeout; work never waits for it (wake on propose,
    # sockets wake the poll), only idle upkeep runs this often: 5 ms cost an idle
    # 3-replica cluster of 4 shards 22% of a core, 20 ms 10%
    auto_tick_period: float = 0.02
    append_entries_period: float = 0.05
    # election timeouts: with pre-vote and check-quorum, 0.3/0.6 s failed over in a
    # median 0.40 s (20 kills; 0.76 s at 0.6/1.2) and saw no election under load
    min_timeout: float = 0.3
    max_timeout: float = 0.6
    connection_timeout: float = 3.5
    leader_fallback_timeout: float = 3.0
    socket_buffer_bytes: int = 4 << 20
    compaction_min_entries: int = 50_000
    compaction_min_seconds: float = 600.0
    compaction_min_bytes: int = 512 << 20
    password: str | None = None
    # True: a write is acknowledged once on stable storage on a majority
    # (docs/reliability.md); False accepts losing recent writes to a power cut
    fsync: bool = True
    # Raft thesis 9.6 (store/elections.py): no election without a majority's
    # pre-vote, no vote while a leader is heard; a leader without a majority steps down
    pre_vote: bool = True
    check_quorum: bool = True
    # "module:Class", a pysyncobj Transport subclass; only the fault tests set it
    transport: str | None = None


@dataclass(frozen=True)
class LimitSettings:
    max_body_bytes: int = 1 << 30
    max_checkpoint_bytes: int = 64 << 30  # PUT /v1/checkpoint streams to disk: 413 beyond
    request_timeout: float = 10.0
    # slow clients (api/slow_clients.py): seconds for a whole request head, and
    # the longest silence inside a request body; 0 turns a timeout off
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    # idle connections (api/connection_caps.py): a new connection must send its first byte within
    # first_byte_timeout; requests in flight past max_active_requests get 503; past max_connections
    # (or max_connections_per_peer from one address) a new connection closes the longest-idle one
    first_byte_timeout: float = 5.0
    max_active_requests: int = 1024
    max_connections: int = 4096
    max_connections_per_peer: int = 512
    max_wait_seconds: float = 60.0
    json_max_elements: int = 1 << 16
    inline_payload_bytes: int = 16 << 10
    dedupe_window: int = 100_000
    # embedding tables (store/tables): the memory all tables of a replica share (their cap:
    # row caches and RocksDB's block cache), and the most IDs one lookup or push may carry (413 beyond)
    table_cache_bytes: int = 256 << 20
    table_max_ids: int = 1 << 20
    # partitioned tensors (store/partitions.py): tensors over partition_auto_bytes (0: never) are cut
    # into parts of about partition_bytes, at most one per shard; X-Partitions may ask up to max_partitions
    partition_auto_bytes: int = 0
    partition_bytes: int = 4 << 20
    max_partitions: int = 256
    # what new large payloads are named by (store/content_id.py): "b3" (BLAKE3, 2.6x cheaper per
    # byte than SHA-256 here), or "sha256" while replicas of versions before b3 ids are in the cluster
    payload_ids: str = "b3"


@dataclass(frozen=True)
class AuthSettings:
    """Bearer tokens for the HTTP API. A write token also reads."""

    read_tokens: tuple[str, ...] = ()
    write_tokens: tuple[str, ...] = ()
    insecure_no_auth: bool = False  # only allowed when every node address is loopback

    @property
    def enabled(self) -> bool:
        return bool(self.read_tokens or self.write_tokens)


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the HTTP API (uvicorn's ssl options); client_ca_file asks for mutual TLS."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None


@dataclass(frozen=True)
class Config:
    shards: int
    replication: int
    nodes: tuple[NodeConfig, ...]
    node_id: str | None = None
    data_dir: Path | None = None
    raft: RaftSettings = field(default_factory=RaftSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    log_level: str = "info"

    @property
    def node(self) -> NodeConfig:
        if self.node_id is None:
            raise ConfigError("node: no node id given (--node or PARAMSTORE_NODE)")
        return self.node_by_id(self.node_id)

    def node_by_id(self, node_id: str) -> NodeConfig:
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(n.id for n in self.nodes)
        raise ConfigError(f"node: {node_id!r} is not in [[nodes]] (known: {known})")

    def all_loopback(self) -> bool:
        return all(a.is_loopback() for n in self.nodes for a in (n.http, n.raft, n.data))


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Coerce a TOML or environment value to a settings field's type."""
    text_type = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if "tuple" in text_type:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            return tuple(i.strip() for i in items if i.strip())
        if "bool" in text_type:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in text_type and "float" not in text_type:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if "float" in text_type:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if value is None or value == "":
            return None
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {text_type}, got {value!r}") from None


def _settings(cls: type, raw: Mapping[str, Any], section: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(known)})")
        values[key] = _coerce(value, known[key].type, f"{section}.{key}")
    obj = cls(**values)
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{section}.{f.name}: must not be negative, got {v}")
    return obj


def _nodes(raw: Any, shards: int) -> tuple[NodeConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("nodes: at least one [[nodes]] entry is required")
    nodes = []
    for i, entry in enumerate(raw):
        where = f"nodes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(entry) - {"id", "http", "raft", "data"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field (known: id, http, raft, data)")
        node_id = entry.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise ConfigError(f"{where}.id: a non-empty string is required")
        for key in ("http", "raft"):
            if key not in entry:
                raise ConfigError(f"{where}.{key}: required ('host:port')")
        http = Address.parse(entry["http"], f"{where}.http")
        raft = Address.parse(entry["raft"], f"{where}.raft")
        if raft.port + shards > 65536:
            raise ConfigError(f"{where}.raft: ports {raft.port}..{raft.port + shards - 1} do not fit")
        data = Address.parse(entry["data"], f"{where}.data") if "data" in entry else raft.with_port(raft.port + shards)
        nodes.append(NodeConfig(node_id, http, raft, data))
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"nodes: duplicate node id in {ids}")
    used: dict[tuple[str, int], str] = {}
    for n in nodes:
        ports = [("http", n.http), ("data", n.data)] + [(f"raft (shard {k})", n.raft_address(k)) for k in range(shards)]
        for what, addr in ports:
            endpoint = (addr.host, addr.port)
            if endpoint in used:
                raise ConfigError(f"nodes[{ids.index(n.id)}].{what.split()[0]}: {addr} is also {used[endpoint]}")
            used[endpoint] = f"{n.id} {what}"
    return tuple(nodes)


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    unknown = set(raw) - {"cluster", "nodes", "raft", "limits", "auth", "tls", "node", "log_level"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section")
    cluster = dict(raw.get("cluster", {}))
    bad = set(cluster) - {"shards", "replication"}
    if bad:
        raise ConfigError(f"cluster.{sorted(bad)[0]}: unknown setting (known: shards, replication)")
    shards = _coerce(cluster.get("shards", 4), "int", "cluster.shards")
    if not 1 <= shards <= 256:
        raise ConfigError(f"cluster.shards: must be 1..256, got {shards}")
    nodes = _nodes(raw.get("nodes"), shards)
    replication = _coerce(cluster.get("replication", min(3, len(nodes))), "int", "cluster.replication")
    if not 1 <= replication <= len(nodes):
        raise ConfigError(f"cluster.replication: must be 1..{len(nodes)} (the number of nodes), got {replication}")
    node = dict(raw.get("node", {}))
    raft = _settings(RaftSettings, raw.get("raft", {}), "raft")
    if raft.min_timeout <= 3 * raft.append_entries_period:
        raise ConfigError("raft.min_timeout: must exceed 3 x raft.append_entries_period")
    if raft.max_timeout <= raft.min_timeout:
        raise ConfigError("raft.max_timeout: must exceed raft.min_timeout")
    if raft.connection_timeout < raft.max_timeout:
        raise ConfigError("raft.connection_timeout: must be >= raft.max_timeout")
    if raft.transport is not None and not re.fullmatch(r"[\w.]+:\w+", raft.transport):
        raise ConfigError(f"raft.transport: expected 'module:Class', got {raft.transport!r}")
    limits = _settings(LimitSettings, raw.get("limits", {}), "limits")
    if limits.inline_payload_bytes > 32 << 10:
        raise ConfigError("limits.inline_payload_bytes: at most 32768 (pysyncobj mangles entries >= 64 KB)")
    if limits.payload_ids not in content_id.KINDS:
        raise ConfigError(f"limits.payload_ids: one of {list(content_id.KINDS)}, got {limits.payload_ids!r}")
    auth = _settings(AuthSettings, raw.get("auth", {}), "auth")
    tls = _settings(TlsSettings, raw.get("tls", {}), "tls")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError("tls.cert_file: cert_file and key_file go together")
    cfg = Config(
        shards=shards,
        replication=replication,
        nodes=nodes,
        node_id=node.get("id"),
        data_dir=Path(node["data_dir"]) if node.get("data_dir") else None,
        raft=raft,
        limits=limits,
        auth=auth,
        tls=tls,
        log_level=str(raw.get("log_level", "info")),
    )
    if cfg.node_id is not None:
        _ = cfg.node  # validates the id
    return cfg


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target = raw
    for p in parts[:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    target[parts[-1]] = value


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """File, then PARAMSTORE_* environment, then explicit overrides.

    Environment: PARAMSTORE_CONFIG (file), PARAMSTORE_NODE, PARAMSTORE_DATA_DIR,
    PARAMSTORE_RAFT_PASSWORD, and PARAMSTORE_<SECTION>__<KEY> for any setting
    (e.g. PARAMSTORE_RAFT__MIN_TIMEOUT=0.8). Overrides use dotted keys
    ("raft.min_timeout", "node.id").
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG")
    if path is None:
        raise ConfigError("config: no file given (--config or PARAMSTORE_CONFIG)")
    try:
        with open(path, "rb") as f:
            raw: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    shortcuts = {
        "NODE": "node.id",
        "DATA_DIR": "node.data_dir",
        "RAFT_PASSWORD": "raft.password",
        "LOG_LEVEL": "log_level",
        "READ_TOKENS": "auth.read_tokens",
        "WRITE_TOKENS": "auth.write_tokens",
    }
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :]
        if name in shortcuts:
            _set_path(raw, shortcuts[name], value)
        elif "__" in name:
            section, _, setting = name.partition("__")
            _set_path(raw, f"{section.lower()}.{setting.lower()}", value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, dotted, value)
    return config_from_mapping(raw)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(i) for i in v) + "]"
    return str(v)


def render_toml(cfg: Config) -> str:
    """The cluster part of a config as TOML (used by `paramstore dev`)."""
    lines = ["[cluster]", f"shards = {cfg.shards}", f"replication = {cfg.replication}", ""]
    for section, obj in (("raft", cfg.raft), ("limits", cfg.limits), ("auth", cfg.auth), ("tls", cfg.tls)):
        diffs = [
            (f.name, getattr(obj, f.name))
            for f in fields(obj)
            if getattr(obj, f.name) != f.default and getattr(obj, f.name) is not None
        ]
        if diffs:
            lines.append(f"[{section}]")
            for k, v in diffs:
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
    for n in cfg.nodes:
        lines += ["[[nodes]]", f'id = "{n.id}"', f'http = "{n.http}"', f'raft = "{n.raft}"', f'data = "{n.data}"', ""]
    return "\n".join(lines)
