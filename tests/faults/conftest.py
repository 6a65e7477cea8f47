import pytest

from tests.cluster.harness import Cluster
from tests.faults import netns


@pytest.fixture
def ns():
    why = netns.available()
    if why:
        pytest.skip(f"fault tests need a private network namespace: {why}")
    n = netns.Netns()
    print(f"\nfault injection: nftables rules in private network namespace {n.name}")
    yield n
    n.close()


@pytest.fixture
def fault_cluster(ns, tmp_path):
    c = Cluster(tmp_path, hosts=["127.0.0.1", "127.0.0.2", "127.0.0.3"], launcher=ns.launcher,
                http=ns.client(), limits={"request_timeout": 2.0},
                raft={"compaction_min_entries": 200})
    c.ns = ns
    c.loads = []
    c.start()
    try:
        c.wait_ready(timeout=40)
        yield c
    finally:
        for load in c.loads:
            load.stop.set()
        c.close()
