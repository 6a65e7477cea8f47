"""paramstore.Client against a real 3-replica cluster (`paramstore dev`) on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from paramstore import Client, ConflictError, InvalidError, NotFoundError, PreconditionFailedError, UnavailableError
from tests.paramstore.devcluster import ROOT, SHARDS, DevCluster
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def test_create_pull_push_round_trip(ps: Client) -> None:
    name = unique("rt")
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert ps.create(name, value, optimizer={"type": "sgd", "lr": 0.5}) == 1
    got, version = ps.pull(name)
    assert version == 1 and got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, value)
    assert not got.flags.writeable  # a zero-copy view of the response body

    grad = np.ones((3, 4), np.float32)
    assert ps.push_grad(name, grad, base_version=version) == 2
    got, version = ps.pull(name)
    assert version == 2
    np.testing.assert_array_equal(got, value - 0.5)

    assert ps.set(name, np.zeros((3, 4), np.float32), if_version=2) == 3
    assert ps.create(name, value, exist_ok=True) == 3  # exists: unchanged, current version
    assert ps.pull(name)[0].sum() == 0

    other = unique("rt-b")
    ps.create(other, np.float64(2.5))  # a scalar, another dtype
    many = ps.pull_many([name, other])
    assert many[other][0].shape == () and many[other][0] == 2.5
    assert ps.push_grads({name: grad}, base_versions={name: 3}) == {name: 4}
    listed = {t["name"]: t for t in ps.list()}
    assert listed[name]["version"] == 4 and listed[other]["dtype"] == "float64"
    assert len(ps.cluster()["shards"]) == SHARDS

    ps.delete(name, if_version=4)
    with pytest.raises(NotFoundError):
        ps.pull(name)
    assert ps.create(name, value) == 1  # re-created: the session forgot the old versions
    assert ps.pull(name)[1] == 1


def test_big_endian_and_non_contiguous_arrays_are_sent_as_little_endian(ps: Client) -> None:
    name = unique("be")
    value = np.arange(20, dtype=">f8").reshape(4, 5)[:, ::2]  # big-endian, strided
    ps.create(name, value)
    got, _ = ps.pull(name)
    assert got.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(got, value)


def test_wait_for(ps: Client) -> None:
    name = unique("wait")
    ps.create(name, np.zeros(3, np.float32))
    assert ps.wait_for(name, 1, timeout=0.3) is None
    assert ps.wait_for(name, 0, timeout=5) == 1
    ps.push_grad(name, np.ones(3, np.float32))  # assign: the gradient becomes the value
    assert ps.wait_for(name, 1, timeout=5) == 2


def test_read_your_writes_across_replicas(cluster: DevCluster) -> None:
    """Writes through replica 0, reads through replica 1 or 2 with the same
    session: every read sees the write just made."""
    name = unique("ryw")
    with Client([cluster.urls[0]]) as writer:
        readers = [Client([u], session=writer.session) for u in cluster.urls[1:]]
        try:
            writer.create(name, np.zeros(256, np.float32))
            for i in range(1, 31):
                version = writer.set(name, np.full(256, i, np.float32))
                assert writer.session[name] == version
                value, got = readers[i % 2].pull(name)
                assert got >= version and value[0] == i, (i, got, version)
        finally:
            for r in readers:
                r.close()


def test_read_your_writes_from_a_paused_replica(cluster: DevCluster) -> None:
    """A follower is paused (SIGSTOP) while the session writes through the
    leader, then resumed and read at once: the pull must wait for it to catch
    up (or move on) instead of returning the value it had before the pause."""
    name = unique("lag")
    with Client(cluster.urls) as c:
        c.create(name, np.zeros(64, np.float32))
        shard = next(t["shard"] for t in c.list() if t["name"] == name)
        leader = wait_until(lambda: c.cluster()["shards"][shard]["leader"], 15, "a leader")
    ids = [f"n{i + 1}" for i in range(3)]
    lagging = next(n for n in ids if n != leader)
    pid = next(p for p in cluster.replica_pids() if f"--node\0{lagging}\0" in Path(f"/proc/{p}/cmdline").read_text())
    with (
        Client([cluster.urls[ids.index(leader)]]) as writer,
        Client([cluster.urls[ids.index(lagging)]], session=writer.session) as reader,
    ):
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(1, 6):
                version = writer.set(name, np.full(64, i, np.float32))
        finally:
            os.kill(pid, signal.SIGCONT)
        value, got = reader.pull(name)
        assert got >= version and value[0] == 5, (got, version)


def test_min_version_ahead_of_every_replica_is_unavailable(cluster: DevCluster) -> None:
    """The session's min_version is enforced: a version no replica has yet
    makes the pull fail over and finally raise UnavailableError."""
    name = unique("ahead")
    with Client(cluster.urls, timeout=1.0, deadline=3.0) as c:
        c.create(name, np.zeros(2, np.float32))
        c.session[name] = 99
        with pytest.raises(UnavailableError):
            c.pull(name)


def test_failover_past_a_dead_url(cluster: DevCluster) -> None:
    dead = closed_port_url()
    with Client([dead, *cluster.urls[1:]], timeout=2.0, deadline=10.0) as c:
        name = unique("fo")
        assert c.create(name, np.ones(4, np.float32)) == 1
        assert c._transport.preferred == 1  # the next calls go straight to the live replica
        np.testing.assert_array_equal(c.pull(name)[0], np.ones(4, np.float32))


def test_all_urls_dead_raises_unavailable_by_the_deadline() -> None:
    with Client([closed_port_url(), closed_port_url()], timeout=0.5, deadline=1.0) as c:
        with pytest.raises(UnavailableError) as info:
            c.pull("anything")
        assert isinstance(info.value.__cause__, httpx.TransportError)


def test_typed_errors(ps: Client) -> None:
    with pytest.raises(NotFoundError) as nf:
        ps.pull(unique("missing"))
    assert nf.value.status == 404 and nf.value.code == "not_found"

    name = unique("typed")
    ps.create(name, np.zeros(3, np.float32), optimizer={"type": "sgd", "lr": 0.1}, max_staleness=0)
    with pytest.raises(PreconditionFailedError) as pf:
        ps.create(name, np.zeros(3, np.float32))
    assert pf.value.status == 412 and pf.value.current_version == 1
    with pytest.raises(PreconditionFailedError) as pf:
        ps.set(name, np.zeros(3, np.float32), if_version=7)
    assert pf.value.current_version == 1

    g = np.ones(3, np.float32)
    assert ps.push_grad(name, g, base_version=1) == 2
    with pytest.raises(ConflictError) as cf:  # computed on v1, one behind: over max_staleness 0
        ps.push_grad(name, g, base_version=1)
    assert cf.value.status == 409 and cf.value.current_version == 2

    with pytest.raises(InvalidError) as inv:
        ps.push_grad(name, np.ones(4, np.float32))
    assert inv.value.status == 422
    with pytest.raises(InvalidError) as inv:
        ps.create("bad name!", g)
    assert inv.value.status == 400
    assert ps.pull(name)[1] == 2  # none of the failures changed anything


def test_same_request_id_applies_once(cluster: DevCluster) -> None:
    """The store's dedupe, at the HTTP level: a second POST with the same
    X-Request-Id (to another replica) returns the first outcome."""
    name = unique("rid")
    with Client(cluster.urls) as c:
        c.create(name, np.zeros(4, np.float32), optimizer={"type": "sgd", "lr": 1.0})
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Dtype": "float32",
        "X-Shape": "4",
        "X-Request-Id": uuid.uuid4().hex,
    }
    body = np.ones(4, np.float32).tobytes()
    with httpx.Client(timeout=10) as http:
        first = http.post(f"{cluster.urls[0]}/v1/tensors/{name}/grad", content=body, headers=headers)
        second = http.post(f"{cluster.urls[1]}/v1/tensors/{name}/grad", content=body, headers=headers)
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.json()["version"] == second.json()["version"] == 2
        assert second.json().get("duplicate") is True
        r = http.get(f"{cluster.urls[0]}/v1/tensors/{name}", params={"min_version": 2})
        assert r.headers["X-Version"] == "2"
        assert np.frombuffer(r.content, np.float32).tolist() == [-1.0] * 4  # applied once


def test_client_retry_after_lost_response_applies_once(cluster: DevCluster) -> None:
    """A push whose response is lost (the write reached the store, then the
    connection timed out) is retried on another replica with the same request
    id, and the gradient is applied exactly once."""
    name = unique("lost")
    with Client(cluster.urls, timeout=5.0, deadline=20.0) as c:
        c.create(name, np.zeros(4, np.float32), optimizer={"type": "sgd", "lr": 1.0})
        first = c._transport.http[c._transport.preferred]
        real_send = first.send
        sent: list[str] = []

        def send_then_lose_response(request: httpx.Request, **kw) -> httpx.Response:
            response = real_send(request, **kw)
            if request.method == "POST" and not sent:
                sent.append(request.headers["X-Request-Id"])
                raise httpx.ReadTimeout("response lost (simulated)", request=request)
            return response

        first.send = send_then_lose_response  # type: ignore[method-assign]  # a fault injected into one client
        seen_ids: list[str] = []
        for other in c._transport.http:
            if other is not first:
                other_send = other.send

                def record(request: httpx.Request, _send=other_send, **kw) -> httpx.Response:
                    seen_ids.append(request.headers.get("X-Request-Id", ""))
                    return _send(request, **kw)

                other.send = record  # type: ignore[method-assign]  # spies on the retry

        version = c.push_grad(name, np.ones(4, np.float32), base_version=1)
        assert sent and seen_ids and seen_ids[0] == sent[0]  # retried elsewhere, same id
        assert version == 2
        value, current = c.pull(name)
        assert current == 2 and value.tolist() == [-1.0] * 4


def test_train_digits_example_reaches_90_percent(cluster: DevCluster) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PARAMSTORE_URLS=",".join(cluster.urls))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--workers", "2", "--prefix", unique("digits")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    m = re.search(r"final: test accuracy ([0-9.]+)", out)
    assert m, out
    assert float(m.group(1)) >= 0.90, out


def test_torch_module_helpers(ps: Client) -> None:
    import torch

    from paramstore import torch as pt

    prefix = unique("net") + "."
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    created = pt.create_module(ps, net, optimizer={"type": "sgd", "lr": 0.5}, prefix=prefix)
    assert created == {prefix + "weight": 1, prefix + "bias": 1}

    replica = torch.nn.Linear(3, 2)
    versions = pt.load_module(ps, replica, prefix=prefix)
    for n, p in replica.named_parameters():
        assert torch.equal(p.detach(), start[n])

    replica(torch.ones(1, 3)).sum().backward()
    new = pt.push_module_grads(ps, replica, prefix=prefix, base_versions=versions)
    assert new == {prefix + "weight": 2, prefix + "bias": 2}
    pt.load_module(ps, net, prefix=prefix)
    for n, p in net.named_parameters():
        expected = start[n] - 0.5 * dict(replica.named_parameters())[n].grad
        assert torch.allclose(p.detach(), expected)
