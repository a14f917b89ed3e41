"""A real Dask cluster for the runtime tests: a scheduler and worker
processes (one thread each), started once per module."""
import pytest
from distributed import Client

from pipetrain.runtime.local import start_local_cluster


@pytest.fixture(scope="module")
def client():
    cluster = start_local_cluster(4)
    with Client(cluster) as c:
        yield c
    cluster.close()
