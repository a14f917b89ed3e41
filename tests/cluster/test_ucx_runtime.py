"""Training over ucx:// on real Dask worker processes equals the reference executor and the tcp:// run bit for bit.

Skipped, with the reason, where ucxx does not import (the pipetrain[ucx] extra).
"""
import pytest
from distributed import Client

from models import mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.local import start_local_cluster
from pipetrain.runtime.transport.ucx import ucx_available
from stage_helpers import assert_runs_equal

MISSING = ucx_available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(MISSING is not None, reason=f"ucxx does not import: {MISSING}")]


@pytest.fixture(scope="module")
def two_workers():
    cluster = start_local_cluster(2)
    with Client(cluster) as c:
        yield c
    cluster.close()


def _ran_ucx() -> bool:
    from pipetrain.runtime.transport.ucx import _Ucx

    return _Ucx._instance is not None


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_two_stages_over_ucx_equal_the_reference_and_tcp_bit_for_bit(two_workers, schedule):
    source = mlp.source(512, microbatch_size=16, seed=3)
    part = partition(mlp.build(sizes=(32, 32, 32)), 2, method="params", example_input=source.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=4, optimizer=Optimizer("adam", lr=3e-3), progress=False)
    over_ucx = fit(part, source, client=two_workers, transport="ucx", **kwargs)
    # both worker processes really ran UCX (its context exists only once an endpoint chose "ucx")
    assert set(two_workers.run(_ran_ucx).values()) == {True}
    assert_runs_equal(over_ucx, fit(part, source, executor="reference", **kwargs))
    assert_runs_equal(over_ucx, fit(part, source, client=two_workers, **kwargs))  # the default tcp:// transport
    assert over_ucx.history[-1]["loss"] < over_ucx.history[0]["loss"]
