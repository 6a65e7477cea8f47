import pytest

from store.config import config_from_mapping, load_config, render_toml
from store.errors import ConfigError
from store.placement import hosts_for, shard_for

NODES = [{"id": f"n{i}", "http": f"127.0.0.1:{8700 + i}", "raft": f"127.0.0.1:{9700 + 10 * i}"} for i in range(3)]


def test_defaults_and_derived_data_port():
    cfg = config_from_mapping({"cluster": {"shards": 4}, "nodes": NODES})
    assert cfg.replication == 3 and cfg.nodes[0].data.port == 9704
    assert cfg.nodes[1].raft_address(2).port == 9712
    assert cfg.all_loopback()


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"cluster": {"shards": 0}, "nodes": NODES}, "cluster.shards"),
        ({"cluster": {"replication": 4}, "nodes": NODES}, "cluster.replication"),
        ({"cluster": {"bogus": 1}, "nodes": NODES}, "cluster.bogus"),
        ({"nodes": []}, "nodes"),
        ({"nodes": [{"id": "a", "http": "nohost", "raft": "127.0.0.1:1"}]}, "nodes[0].http"),
        ({"nodes": [{"id": "a", "http": "127.0.0.1:x", "raft": "127.0.0.1:1"}]}, "nodes[0].http"),
        ({"nodes": [*NODES, NODES[0]]}, "nodes"),
        ({"nodes": [{"id": "a", "http": "127.0.0.1:9700", "raft": "127.0.0.1:9700"}]}, "nodes[0]"),
        ({"nodes": NODES, "raft": {"min_timeout": "fast"}}, "raft.min_timeout"),
        ({"nodes": NODES, "raft": {"min_timeout": 0.1}}, "raft.min_timeout"),
        ({"nodes": NODES, "limits": {"inline_payload_bytes": 1 << 20}}, "limits.inline_payload_bytes"),
        ({"nodes": NODES, "limits": {"header_timeout": -1}}, "limits.header_timeout"),
        ({"nodes": NODES, "limits": {"payload_ids": "md5"}}, "limits.payload_ids"),
        ({"nodes": NODES, "raft": {"transport": "no colon"}}, "raft.transport"),
        ({"nodes": NODES, "node": {"id": "zz"}}, "node"),
    ],
)
def test_wrong_config_names_the_field(raw, field):
    with pytest.raises(ConfigError) as e:
        config_from_mapping(raw)
    assert e.value.detail.startswith(field), e.value.detail


def test_file_env_and_overrides_layer(tmp_path):
    cfg = config_from_mapping({"cluster": {"shards": 2}, "nodes": NODES})
    path = tmp_path / "c.toml"
    path.write_text(render_toml(cfg))
    env = {"PARAMSTORE_NODE": "n1", "PARAMSTORE_RAFT__MIN_TIMEOUT": "0.9", "PARAMSTORE_DATA_DIR": "/x"}
    loaded = load_config(path, env=env, overrides={"raft.max_timeout": "2.0"})
    assert loaded.node.id == "n1" and loaded.raft.min_timeout == 0.9 and loaded.raft.max_timeout == 2.0
    assert str(loaded.data_dir) == "/x" and loaded.shards == 2
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    (tmp_path / "bad.toml").write_text("[cluster\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", env={})


def test_placement_is_stable_and_spread():
    assert shard_for("layer1.weight", 4) == shard_for("layer1.weight", 4)
    assert shard_for("layer1.weight", 4) == 3  # fixed: clients and replicas must agree forever
    counts = [0] * 4
    for i in range(1000):
        counts[shard_for(f"t{i}", 4)] += 1
    assert min(counts) > 200
    assert hosts_for(1, ["a", "b", "c"], 2) == ["b", "c"]
    assert hosts_for(2, ["a", "b", "c"], 3) == ["c", "a", "b"]


def test_raft_transport_loads_a_transport_class_or_says_why():
    from store.pysyncobj_adapter import CountingTransport
    from store.transport import transport_class

    assert transport_class(None) is CountingTransport  # pysyncobj's TCPTransport, counting bytes per peer
    assert transport_class("tests.faults.droptransport:DropTransport").__name__ == "DropTransport"
    for spec in ("no.such.module:X", "store.config:Config", "tests.faults.droptransport:Nope"):
        with pytest.raises(ConfigError, match=r"raft\.transport"):
            transport_class(spec)
