import pytest

from tests.cluster.harness import Cluster


@pytest.fixture
def make_cluster(tmp_path):
    made = []

    def make(**kwargs) -> Cluster:
        d = tmp_path / f"cluster{len(made)}"
        d.mkdir()
        c = Cluster(d, **kwargs)
        made.append(c)
        c.start()
        c.wait_ready()
        return c

    yield make
    for c in made:
        c.close()
