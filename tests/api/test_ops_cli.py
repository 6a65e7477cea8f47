"""`paramstore status|get|put|checkpoint` against the in-process replica."""

import io
import json

import numpy as np
from safetensors.numpy import load_file

from api import ops_cli

URL = "http://testserver"  # the TestClient's base URL


def run(client, *argv):
    out = io.StringIO()
    code = ops_cli.main([*argv, "--url", URL], http=client, out=out)
    return code, out.getvalue()


def test_put_then_get_roundtrip(client, tmp_path):
    src = tmp_path / "in.npy"
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(src, value)
    code, text = run(client, "put", "cli.w", str(src), "--optimizer", '{"type": "sgd", "lr": 0.5}', "--create")
    assert code == 0 and "created, version 1" in text
    code, _ = run(client, "put", "cli.w", str(src), "--create")
    assert code == 1  # If-None-Match: * refused by the store
    code, text = run(client, "put", "cli.w", str(src), "--if-version", "1")
    assert code == 0 and "replaced, version 2" in text
    out = tmp_path / "out.npy"
    code, text = run(client, "get", "cli.w", "-o", str(out), "--linearizable")
    assert code == 0 and "version 2" in text
    got = np.load(out)
    np.testing.assert_array_equal(got, value)
    assert got.dtype == np.float32
    spec = {t["name"]: t for t in client.get("/v1/tensors").json()}["cli.w"]["optimizer"]
    assert spec["type"] == "sgd" and spec["lr"] == 0.5


def test_get_unknown_tensor_fails(client, tmp_path, capsys):
    code, _ = run(client, "get", "cli.nope", "-o", str(tmp_path / "x.npy"))
    assert code == 1
    assert "not_found" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_status_table(client):
    code, text = run(client, "status")
    assert code == 0
    assert "n0" in text and "leader" in text and "shard" in text
    assert "leader / 1 /" in text  # the replica table: role / term / applied index
    code, text = run(client, "status", "--json")
    doc = json.loads(text)
    assert code == 0 and len(doc["shards"]) == 2 and doc["node"] == "n0"


def test_checkpoint_save_and_load(client, tmp_path):
    np.save(tmp_path / "a.npy", np.full((2, 2), 3.0, np.float32))
    assert run(client, "put", "cli.ck", str(tmp_path / "a.npy"))[0] == 0
    path = tmp_path / "all.safetensors"
    code, text = run(client, "checkpoint", "save", str(path), "--no-progress")
    assert code == 0 and "saved" in text
    arrays = load_file(str(path))
    np.testing.assert_array_equal(arrays["cli.ck"], np.full((2, 2), 3.0, np.float32))
    assert client.delete("/v1/tensors/cli.ck").status_code == 200
    code, text = run(client, "checkpoint", "load", str(path))  # with the progress bar
    assert code == 0 and "created 1," in text
    r = client.get("/v1/tensors/cli.ck")
    assert r.status_code == 200 and np.frombuffer(r.content, "<f4").tolist() == [3.0] * 4
    code, text = run(client, "checkpoint", "load", str(path), "--mode", "replace", "--no-progress")
    assert code == 0 and "created 0, replaced" in text
    assert run(client, "checkpoint", "load", str(path), "--if-unchanged")[0] == 2


def test_unreachable_replica_is_reported(capsys):
    code = ops_cli.main(["status", "--url", "http://127.0.0.1:9", "--timeout", "2"])
    assert code == ops_cli.EXIT_UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err


def test_failed_save_leaves_no_file(client, tmp_path, capsys):
    out = io.StringIO()
    path = tmp_path / "x.safetensors"
    code = ops_cli.main(
        ["checkpoint", "save", str(path), "--no-progress", "--url", URL + "/wrong"], http=client, out=out
    )
    assert code == 1 and "HTTP 404" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
