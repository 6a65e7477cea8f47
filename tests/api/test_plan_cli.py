"""`paramstore plan`: flags, model files, output forms and refusals (the maths: tests/paramstore/test_plan.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from api import plan_cli
from api.cli import main

WORKED = ["plan", "--params", "7e9", "--workers", "64", "--bandwidth", "25", "--step-time", "10", "--replicas", "3"]


def test_worked_example_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*WORKED, "--latency", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_bytes"] == 28_000_000_000
    assert doc["job"]["bandwidth"] == 25e9 / 8
    assert doc["worker_sent"] == doc["worker_received"] == 28e9
    assert doc["allreduce_time"] == pytest.approx(17.64)
    assert doc["ps"]["total"] == pytest.approx(573.44 + 191.146667)
    assert doc["nodes_for_worker_links"] == 192
    assert [o["compress"] for o in doc["options"]] == ["none", "float16", "bfloat16", "int8", "topk:0.01"]
    assert doc["verdict"][0].startswith("Ring all-reduce fits better")


def test_table_names_the_bottleneck_and_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(WORKED) == 0
    text = capsys.readouterr().out
    for expected in ("Bytes per step", "ring all-reduce", "store node downlink (gradients in)", "topk:0.01", "int8"):
        assert expected in text
    assert "17.6 s" in text and "28 GB" in text


def test_text_fallback_aligns_columns() -> None:
    out = io.StringIO()
    plan_cli.render_text([("T", ["", "sent"], [["worker", "28 GB"], ["busiest store node", "1.79 TB"]])], ["n"], out)
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["T", " " * 25 + "sent", "  worker" + " " * 16 + "28 GB", "  busiest store node  1.79 TB"]
    assert lines[-1] == "n"


def test_model_files_are_counted(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    st = tmp_path / "m.safetensors"
    save_file({"w": np.zeros((300, 200), np.float16), "b": np.zeros(200, np.float32)}, str(st))
    assert plan_cli.count_model(st) == (60_200, "float16")
    ckpt = tmp_path / "m.pt"
    torch.save({"model": {"w": torch.zeros(10, 10), "b": torch.zeros(10)}, "step": 7, "opt": [torch.zeros(5)]}, ckpt)
    assert plan_cli.count_model(ckpt) == (115, "float32")
    assert main(["plan", "--model", str(st), "--workers", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["params"] == 60_200 and doc["job"]["dtype"] == "float16"
    assert doc["model_bytes"] == 120_400


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--params", "abc", "--workers", "2"], "parameter count 'abc'"),
        (["--params", "1e6", "--workers", "0"], "workers must be at least 1"),
        (["--params", "1e6", "--workers", "2", "--compress", "topk:1.5"], "must be in (0, 1]"),
        (["--params", "1e6", "--workers", "2", "--replicas", "2", "--replication", "3"], "replication 3 needs"),
        (["--params", "1e6", "--workers", "2", "--latency", "fast"], "duration 'fast'"),
        (["--model", "/nonexistent/m.safetensors", "--workers", "2"], "No such file"),
    ],
)
def test_bad_input_is_a_clear_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.startswith("paramstore plan: ")


def test_not_a_model_file(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    assert main(["plan", "--model", str(junk), "--workers", "2"]) == 2
    assert "not a safetensors file or torch checkpoint" in capsys.readouterr().err


def test_placement_from_a_cluster_document() -> None:
    from api.plan_measure import placement, probe_name
    from store.placement import shard_for

    doc = {
        "node": "n1",
        "replication": 2,
        "shards": [
            {"shard": 0, "replicas": ["n1", "n2"], "leader": "n2", "bytes": 300},
            {"shard": 1, "replicas": ["n2", "n3"]},  # not hosted by n1: no leader or bytes known
            {"shard": 2, "replicas": ["n3", "n1"], "leader": "n1", "bytes": 100},
        ],
    }
    p = placement(doc)
    assert (p.nodes, p.shards, p.replication) == (("n1", "n2", "n3"), 3, 2)
    assert p.lead_shares == pytest.approx((0.25, 0.75, 0.0))  # by stored bytes; shard 1 holds none known
    assert p.host_shares == pytest.approx((1.0, 0.75, 0.25))
    empty = placement({**doc, "shards": [{k: v for k, v in s.items() if k != "bytes"} for s in doc["shards"]]})
    assert empty.lead_shares == pytest.approx((1 / 3, 2 / 3, 0.0))  # by shard count; shard 1 -> its first replica
    assert shard_for(probe_name(doc), 3) in (0, 2)  # a shard n1 hosts: no redirect


# Hand-computed placement: shard_for("model", 3) = 1, so part i of "model" sits in
# shard (1 + i) mod 3; with replication 2 shard k is hosted by nodes k, k+1 (mod 3)
# and led by node k. 10 rows in 4 parts: 3, 3, 2, 2 rows in shards 1, 2, 0, 1.
PARTS = ["plan", "--params", "10M", "--rows", "10", "--workers", "4", "--bandwidth", "8", "--latency", "0"]
PARTS += ["--replicas", "3", "--shards", "3", "--replication", "2", "--json"]


def test_partitions_use_the_real_placement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PARTS, "--partitions", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["lead_shares"] == pytest.approx([0.2, 0.5, 0.3])
    assert doc["job"]["host_shares"] == pytest.approx([0.5, 0.7, 0.8])
    # 4 workers x 40 MB: node 2 hosts 8/10 of the rows and receives 128 MB, in 0.128 s
    # at 1 GB/s; node 1 leads 5/10 and serves 80 MB of pulls.
    assert doc["node_received"] == pytest.approx([80e6, 112e6, 128e6])
    assert doc["ps"]["push"] == pytest.approx(0.128)
    assert doc["ps"]["pull"] == pytest.approx(0.080)


def test_one_part_is_the_whole_tensor_on_one_shard(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PARTS, "--partitions", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["lead_shares"] == [0.0, 1.0, 0.0]
    assert doc["job"]["host_shares"] == [0.0, 1.0, 1.0]
    assert doc["ps"]["push"] == pytest.approx(0.160)  # node 1 takes and forwards 4 x 40 MB
    assert doc["ps"]["pull"] == pytest.approx(0.160)


def test_partition_mb_picks_k_as_the_store_does(capsys: pytest.CaptureFixture[str]) -> None:
    # 40 MB in parts of about 4 MB: 10 parts, at most one per shard: 3 (4, 3, 3 rows in shards 1, 2, 0).
    assert main([*PARTS, "--partition-mb", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["lead_shares"] == pytest.approx([0.3, 0.4, 0.3])
    assert "3 part(s)" in doc["notes"][-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partitions", "0"], "partitions must be in 1..rows (10), got 0"),
        (["--partitions", "11"], "partitions must be in 1..rows (10), got 11"),
        (["--partitions", "2", "--rows", "7"], "--rows 7 must divide"),
        (["--partition-mb", "0"], "--partition-mb must be positive"),
    ],
)
def test_bad_partitions_are_a_clear_error(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a for a in PARTS if a != "--json"]
    if "--rows" in extra:
        i = argv.index("--rows")
        del argv[i : i + 2]
    assert main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("paramstore plan: ") and message in captured.err
