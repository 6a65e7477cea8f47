import pytest

from tests.cluster.harness import Cluster
from tests.faults import modes, netns
from tests.ports import free_range

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
MODE, WHY = modes.choose()


@pytest.fixture(params=[MODE])
def faults(request, tmp_path):
    """The fault injector this run uses (its name is in every test id)."""
    if request.param == "netns":
        why = modes.namespaces_unavailable()
        if why:
            if "forced" in WHY:
                pytest.fail(f"PARAMSTORE_FAULTS=netns, but {why}")
            pytest.skip(f"fault tests need a private network namespace: {why}")
        f = netns.Netns()
        print(f"\nfault injection: netns, nftables rules in private network namespace {f.name} ({WHY})")
    else:
        f = modes.LinkFile(tmp_path / "cut-links")
        print(
            f"\nfault injection: transport, pysyncobj DropTransport reading {f.path} ({WHY}); only Raft links are cut"
        )
    yield f
    f.close()


def _cluster(faults, tmp_path, spare_hosts: tuple[str, ...] = ()):
    raft = {"compaction_min_entries": 200}
    if faults.mode == "netns":
        kw = dict(launcher=faults.launcher, http=faults.client())
    else:  # replicas share this network namespace: free ports on all their addresses
        raft["transport"] = modes.TRANSPORT
        kw = dict(base_port=free_range(5, *HOSTS, *spare_hosts), env=faults.env)
    c = Cluster(tmp_path, hosts=HOSTS, limits={"request_timeout": 2.0}, raft=raft, spare_hosts=list(spare_hosts), **kw)
    c.faults = faults
    c.loads = []
    c.start()
    try:
        c.wait_ready(timeout=40)
        yield c
    finally:
        for load in c.loads:
            load.stop.set()
        c.close()


@pytest.fixture
def fault_cluster(faults, tmp_path):
    yield from _cluster(faults, tmp_path)


@pytest.fixture
def member_cluster(faults, tmp_path):
    """Three members plus two spare nodes (n4 on .4, n5 on .5) that can join."""
    yield from _cluster(faults, tmp_path, ("127.0.0.4", "127.0.0.5"))
