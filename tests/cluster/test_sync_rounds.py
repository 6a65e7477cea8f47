"""Synchronous rounds on 3 real replicas: N workers with batch b compute what
one process computes with batch N*b and the same torch optimizer, step for
step; bit-exact when the gradients reach the log in a known order; a leader
SIGKILL in the middle of a round loses no acknowledged gradient; the
leader's timer closes a round that misses gradients."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from paramstore import Client, ConflictError
from tests.cluster.harness import Cluster
from tests.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

N, BATCH, STEPS = 3, 4, 4
SGD = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
SHAPES = {"W1": (6, 8), "b1": (8,), "W2": (8, 3)}
Params = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("sync"), shards=1)  # one shard: its leader is the one to kill
    c.start()
    c.wait_ready()
    yield c
    c.close()


@pytest.fixture
def clients(cluster):
    """N workers' clients, each trying a different replica first."""
    urls = list(cluster.urls.values())
    made = [Client(urls[i:] + urls[:i], deadline=60) for i in range(N)]
    yield made
    for c in made:
        c.close()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Identical inputs give identical float32 gradients only with the same reduction splits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def initial() -> Params:
    rng = np.random.default_rng(7)
    return {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in SHAPES.items()}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((STEPS, N * BATCH, 6)).astype(np.float32)
    y = rng.integers(0, 3, (STEPS, N * BATCH))
    return x, y


def gradients(params: Params, x: np.ndarray, y: np.ndarray) -> Params:
    """The mean cross-entropy's gradient of a 2-layer MLP on (x, y)."""
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    logits = torch.tanh(torch.from_numpy(x) @ p["W1"] + p["b1"]) @ p["W2"]
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    return {k: t.grad.numpy() for k, t in p.items()}


def torch_training(step_grads: Callable[[Params, int], Params]) -> list[Params]:
    """Parameters after each step of torch.optim.SGD fed `step_grads(params, step)`."""
    p = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in initial().items()}
    opt = torch.optim.SGD(list(p.values()), lr=SGD["lr"], momentum=SGD["momentum"])
    out = []
    for step in range(STEPS):
        grads = step_grads({k: t.detach().numpy().copy() for k, t in p.items()}, step)
        for k, t in p.items():
            t.grad = torch.from_numpy(grads[k])
        opt.step()
        out.append({k: t.detach().numpy().copy() for k, t in p.items()})
    return out


def big_batch() -> list[Params]:
    """One process, batch N*b."""
    x, y = data()
    return torch_training(lambda params, s: gradients(params, x[s], y[s]))


def workers_in_rank_order() -> list[Params]:
    """The mean of the N workers' gradients, summed in rank order as the store sums them in log order."""
    x, y = data()

    def mean(params: Params, s: int) -> Params:
        g = [gradients(params, x[s, i * BATCH : (i + 1) * BATCH], y[s, i * BATCH : (i + 1) * BATCH]) for i in range(N)]
        return {
            k: ((torch.from_numpy(g[0][k]) + torch.from_numpy(g[1][k]) + torch.from_numpy(g[2][k])) / N).numpy()
            for k in g[0]
        }

    return torch_training(mean)


def create(client: Client, prefix: str, **sync) -> None:
    for k, v in initial().items():
        client.create(f"{prefix}{k}", v, optimizer=SGD, sync={"workers": N, **sync})


def worker_grads(params: Params, step: int, rank: int) -> Params:
    x, y = data()
    sl = slice(rank * BATCH, (rank + 1) * BATCH)
    return gradients(params, x[step, sl], y[step, sl])


def pulled(client: Client, prefix: str) -> tuple[Params, dict[str, int]]:
    got = client.pull_many([prefix + k for k in SHAPES])
    return {k: got[prefix + k][0].copy() for k in SHAPES}, {k: got[prefix + k][1] for k in SHAPES}


def assert_close(ours: Params, ref: Params, what: str) -> None:
    for k in SHAPES:
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-6, err_msg=f"{what}: {k}")


def assert_identical(ours: Params, ref: Params, what: str) -> None:
    for k in SHAPES:
        assert ours[k].tobytes() == ref[k].tobytes(), f"{what}: {k} differs by {np.abs(ours[k] - ref[k]).max()}"


def push_in_rank_order(clients: list[Client], prefix: str, step: int, before_last: Callable[[], None] | None = None):
    """Each worker's batch push, one after the other (each acknowledged first): the log order is rank order."""
    params, versions = pulled(clients[0], prefix)
    for rank, client in enumerate(clients):
        if rank == N - 1 and before_last is not None:
            before_last()
        grads = worker_grads(params, step, rank)
        client.push_grads({prefix + k: g for k, g in grads.items()}, {prefix + k: v for k, v in versions.items()})
    # The last worker's push closed the round; the replica clients[0] reads from
    # may not have applied that yet: wait for it (the client then reads at least it).
    for k, v in versions.items():
        assert clients[0].wait_for(prefix + k, v, timeout=20) == v + 1, f"round of {k} not closed within 20 s"
    after, new_versions = pulled(clients[0], prefix)
    assert new_versions == {k: v + 1 for k, v in versions.items()}
    return after


def test_workers_in_rank_order_match_one_process_bit_for_bit(cluster, clients):
    create(clients[0], "seq.")
    ranked, big = workers_in_rank_order(), big_batch()
    for step in range(STEPS):
        ours = push_in_rank_order(clients, "seq.", step)
        assert_identical(ours, ranked[step], f"step {step} vs torch, N gradients summed in rank order")
        assert_close(ours, big[step], f"step {step} vs torch, batch N*b")
    digests = {cluster.digest(n, "seq.W1", min_version=STEPS + 1) for n in cluster.ids}
    assert len(digests) == 1  # every replica holds the same bytes


def test_concurrent_workers_match_one_process_with_the_big_batch(clients):
    create(clients[0], "conc.")
    seen: list[list[Params]] = [[] for _ in range(N)]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            c = clients[rank]
            params, versions = pulled(c, "conc.")
            for step in range(STEPS):
                grads = worker_grads(params, step, rank)
                new = c.sync_step(
                    {"conc." + k: g for k, g in grads.items()},
                    {"conc." + k: v for k, v in versions.items()},
                    timeout=60,
                )
                params = {k: new["conc." + k][0].copy() for k in SHAPES}
                versions = {k: new["conc." + k][1] for k in SHAPES}
                seen[rank].append(params)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    big = big_batch()
    for step in range(STEPS):
        for rank in range(N):
            assert_identical(seen[rank][step], seen[0][step], f"step {step}: worker {rank} saw other values")
        assert_close(seen[0][step], big[step], f"step {step} vs torch, batch N*b")


def test_round_timeout_and_backup_workers(cluster, clients):
    c = clients[0]
    w0 = np.array([1.0, 2.0], np.float32)
    c.create(
        "to.w", w0, optimizer={"type": "sgd", "lr": 0.5}, sync={"workers": 3, "backup_workers": 1, "round_timeout": 0.5}
    )
    c.push_grad("to.w", np.array([2.0, 2.0], np.float32), base_version=1)  # 1 of the 2 needed
    assert c.wait_for("to.w", 1, timeout=20) == 2  # the leader's timer closed it
    for nid in cluster.ids:
        value, version = cluster.get(nid, "to.w", min_version=2)
        assert version == 2 and value.tolist() == [0.0, 1.0]
    with pytest.raises(ConflictError) as e:
        c.push_grad("to.w", np.array([9.0, 9.0], np.float32), base_version=1)  # a late worker
    assert e.value.body["round"] == {"version": 2, "received": 0, "needed": 2}
    c.push_grad("to.w", np.array([1.0, 1.0], np.float32), base_version=2)
    assert c.push_grad("to.w", np.array([3.0, 3.0], np.float32), base_version=2) == 3  # N - B closes it
    # the backup worker through sync_step: its gradient is refused as late, its step skipped
    late = c.sync_step({"to.w": np.array([9.0, 9.0], np.float32)}, {"to.w": 2}, timeout=10)
    assert late["to.w"][1] == 3 and late["to.w"][0].tolist() == [-1.0, 0.0]
    with pytest.raises(ConflictError):
        c.sync_step({"to.w": np.array([9.0, 9.0], np.float32)}, {"to.w": 7}, timeout=10)  # not late: from the future
    for nid in cluster.ids:
        metrics = cluster.http.get(cluster.urls[nid] + "/metrics").text
        assert _metric(metrics, "paramstore_shard_sync_rounds_timed_out_total") >= 1
        assert _metric(metrics, "paramstore_shard_sync_rounds_closed_total") >= 2


def test_torch_module_helpers(clients):
    from paramstore.torch import create_module, load_module, sync_module_step

    torch.manual_seed(0)
    net, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.load_state_dict(net.state_dict())
    create_module(clients[0], net, optimizer={"type": "sgd", "lr": 0.1}, prefix="tm.", sync={"workers": 1})
    versions = load_module(clients[0], net, prefix="tm.")
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for m in (net, ref):
        m(x).square().mean().backward()
    opt.step()
    assert sync_module_step(clients[0], net, versions, prefix="tm.") == {k: v + 1 for k, v in versions.items()}
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_leader_killed_in_the_middle_of_a_round_loses_no_acknowledged_gradient(cluster, clients):
    create(clients[0], "fo.")
    ranked = workers_in_rank_order()
    # a round that only its timeout will close, opened just before the leader dies: the new leader times it
    timed = {"workers": 3, "round_timeout": 2.0}
    clients[0].create("fo.timed", np.ones(2, np.float32), optimizer={"type": "sgd", "lr": 1.0}, sync=timed)
    victim = cluster.leader_of(0)
    survivors = [n for n in cluster.ids if n != victim]

    def kill() -> None:
        clients[0].push_grad("fo.timed", np.array([0.5, 0.25], np.float32), base_version=1)
        cluster.kill(victim)

    for step in range(STEPS):
        # step 1: workers 0 and 1 pushed (acknowledged), then the leader dies before worker 2 pushes
        if step == 2:
            assert cluster.leader_of(0, among=survivors) != victim
        ours = push_in_rank_order(clients, "fo.", step, before_last=kill if step == 1 else None)
        assert_identical(ours, ranked[step], f"step {step} (leader killed in step 1)")
    for nid in survivors:
        value, version = cluster.get(nid, "fo.timed", min_version=2, timeout=20)
        assert version == 2 and value.tolist() == [0.5, 0.75]
    cluster.restart(victim)
    wait_until(lambda: cluster.get(victim, "fo.W2")[1] == STEPS + 1, 30, "the restarted replica to catch up")
    assert len({cluster.digest(n, "fo.W2") for n in cluster.ids}) == 1


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))
