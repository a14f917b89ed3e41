"""Delay corrections on real worker processes: the Dask run equals the reference
executor bit for bit (losses and every state entry, correction state
included), for JAX stages and for a JAX -> torch -> Keras pipeline."""
import numpy as np
import pytest

from models import mixed, mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _assert_same(a, b, *, correction_state: bool):
    assert a.losses == b.losses
    for s, (x, y) in enumerate(zip(a.states, b.states, strict=True)):
        assert x.keys() == y.keys(), f"stage {s}"
        assert any(name.startswith("corr/") for name in x) == correction_state, f"stage {s}"
        for name in x:
            assert np.array_equal(x[name], y[name]), f"stage {s}: {name} differs"


@pytest.mark.parametrize("schedule,correction", [("pipedream", "predict"), ("2bw", "dcasgd-a"),
                                                 ("pipedream", "dcasgd")])
def test_jax_pipeline_with_a_correction_equals_reference_bit_for_bit(client, schedule, correction):
    source = mlp.source(1024, microbatch_size=16, seed=1)
    part = partition(mlp.build(sizes=(32, 32, 32)), 3, method="params", example_input=source.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=5, optimizer=Optimizer("adam", lr=3e-3),
                  correction=correction, progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    _assert_same(dask_run, fit(part, source, executor="reference", **kwargs), correction_state=correction != "dcasgd")


def test_mixed_pipeline_with_weight_prediction_equals_reference_bit_for_bit(client):
    source = mixed.train_source(n=512, microbatch_size=16)
    part = partition(mixed.build(), 3, boundaries=[2, 4], example_input=source.inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=4, steps=4, correction="predict",
                  optimizer=Optimizer("momentum", lr=0.05), progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    _assert_same(dask_run, fit(part, source, executor="reference", **kwargs), correction_state=True)
