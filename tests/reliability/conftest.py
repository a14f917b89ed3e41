"""A real Dask cluster for the reliability tests: a scheduler, worker processes
under nannies (a killed worker comes back at a new address), one thread each.

Three-stage jobs run on four workers, so one spare is there for re-placement;
between tests the cluster is given time to heal back to four workers.
"""
import dask
import pytest
from distributed import Client, LocalCluster

from pipetrain.runtime.local import single_thread_env

WORKERS = 4

# A LocalCluster closes a killed worker's nanny if, 15 s (this setting) after the kill, no
# worker of that name is registered. Tests that kill workers a few seconds apart can land a
# second kill of the same worker exactly then, and the cluster is a worker short for the rest
# of the module (seen once in CI: "no workers to place the stages on"). The nannies restart
# killed workers themselves; the cluster never needs to give up on one here.
dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})


def start_cluster(n_workers: int = WORKERS, **scheduler_kwargs) -> LocalCluster:
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit=0,
                        dashboard_address=":0", env=single_thread_env(), silence_logs=50,
                        scheduler_kwargs=scheduler_kwargs or None)


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        c.wait_for_workers(WORKERS, timeout=60)
        yield c
