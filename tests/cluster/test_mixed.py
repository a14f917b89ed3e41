"""One pipeline, three frameworks: JAX -> torch -> Keras stages.

The mixed MLP (models/mixed.py) and its all-JAX twin start from the same
weights, so for the flush schedules the mixed pipeline's gradients equal the
twin's unpartitioned gradient; an asynchronous mixed run on real worker
processes equals the reference executor bit for bit; and each stage process
imports only its own framework.
"""
from dataclasses import replace

import numpy as np
import pytest
from distributed import Client

from models import mixed, mlp
from oracles import full_gradient, initial_params
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.local import start_local_cluster
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import build_schedule

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SOURCE = mixed.train_source(n=512, microbatch_size=16)

# Where each twin parameter lives in the mixed stages' state: (stage, name, transpose?)
_MIXED_NAMES = {
    "dense0/w": (0, "dense0/w", False), "dense0/b": (0, "dense0/b", False),
    "dense1/w": (1, "0.weight", True), "dense1/b": (1, "0.bias", False),
    "dense2/w": (2, "0.kernel", False), "dense2/b": (2, "0.bias", False),
    "dense3/w": (2, "2.kernel", False), "dense3/b": (2, "2.bias", False),
}


def _mixed_partition(**kwargs):
    return partition(mixed.build(**kwargs), 3, boundaries=[2, 4], example_input=SOURCE.inputs(0))


# Run on the workers through the builtin eval: a function of this module
# would be unpickled there by importing this module, and with it JAX.
_FRAMEWORKS_LOADED = "sorted(m for m in ('jax', 'torch', 'tensorflow', 'keras') if m in __import__('sys').modules)"


def _frameworks_loaded(client) -> dict:
    return client.run(eval, _FRAMEWORKS_LOADED)


@pytest.mark.parametrize("schedule_name", ["gpipe", "1f1b"])
def test_mixed_gradient_equals_the_single_framework_model(schedule_name):
    m = 4
    part = _mixed_partition()
    stages = build_stages(part, Optimizer("sgd", lr=0.1))
    schedule = build_schedule(schedule_name, num_stages=3, microbatches=m, steps=1)
    schedule = replace(schedule, actions=tuple(tuple(a for a in acts if a.kind is not Kind.UPDATE)
                                               for acts in schedule.actions))
    run_reference(schedule, stages=stages, source=SOURCE)

    layers = mlp.layers(sizes=mixed.SIZES, kind="tanh")
    oracle = full_gradient(layers, mlp.loss_fn, initial_params(layers, SOURCE.inputs(0)),
                           [(SOURCE.inputs(k), SOURCE.targets(k)) for k in range(m)])
    states = [stage.state_dict() for stage in stages]
    by_layer = dict(zip([layer.name for layer in layers], oracle))
    for twin_name, (s, name, transpose) in _MIXED_NAMES.items():
        layer, key = twin_name.split("/")
        want = np.asarray(by_layer[layer][key])
        count = int(np.asarray(states[s].get("meta/count", states[s].get("meta/accumulated"))))
        got = states[s][f"acc/{name}"] / count
        np.testing.assert_allclose(got.T if transpose else got, want, rtol=1e-5, atol=1e-7, err_msg=twin_name)


def test_mixed_pipedream_on_dask_equals_reference_and_imports_only_its_framework():
    part = _mixed_partition(split_backward=True)
    kwargs = dict(schedule="pipedream", microbatches=4, steps=4, optimizer=Optimizer("adam", lr=1e-2), progress=False)
    cluster = start_local_cluster(3)
    try:
        with Client(cluster) as client:
            dask_run = fit(part, SOURCE, client=client, **kwargs)
            loaded = _frameworks_loaded(client)
    finally:
        cluster.close()
    reference = fit(part, SOURCE, executor="reference", **kwargs)
    assert dask_run.losses == reference.losses
    for s, (a, b) in enumerate(zip(dask_run.states, reference.states)):
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), f"stage {s}: {name}"
    # The torch stage (stage 1) split its backward: each micro-batch's weight
    # gradients (W) ran right after its gradient was sent; the others did not.
    torch_events = dask_run.events[1]
    kinds = list(torch_events["kind"])
    weights = [int(e["k"]) for e in torch_events if e["kind"] == "W"]
    assert weights == list(range(16))
    for i, kind in enumerate(kinds):
        if kind == "W":
            assert kinds[i - 1] == "SEND_B" and torch_events["k"][i - 1] == torch_events["k"][i]
            assert torch_events["start"][i] >= torch_events["end"][i - 1]
    assert not any("W" in list(e["kind"]) for e in (dask_run.events[0], dask_run.events[2]))
    # Three worker processes, one stage each: one loaded only JAX, one only
    # torch, one TensorFlow/Keras and no torch. (TensorFlow itself imports JAX
    # when it is installed: tensorflow/lite/python/util.py does `from jax import jit`.)
    assert sorted(map(tuple, loaded.values())) == [("jax",), ("jax", "keras", "tensorflow"), ("torch",)]


def test_jax_only_job_never_imports_torch_or_tensorflow():
    source = mlp.source(256, microbatch_size=8)
    part = partition(mlp.build(), 2, example_input=source.inputs(0))
    cluster = start_local_cluster(2)
    try:
        with Client(cluster) as client:
            fit(part, source, client=client, schedule="1f1b", microbatches=2, steps=2, progress=False)
            loaded = _frameworks_loaded(client)
    finally:
        cluster.close()
    assert all(frameworks == ["jax"] for frameworks in loaded.values()), loaded


def test_a_stage_may_not_straddle_two_frameworks():
    from pipetrain.stages.base import PartitionError

    with pytest.raises(PartitionError, match="cross from the jax part into the torch part"):
        build_stages(partition(mixed.build(), 2, boundaries=[3], example_input=SOURCE.inputs(0)), Optimizer())


def test_the_partitioner_cuts_between_frameworks():
    part = partition(mixed.build(), 4, method="params", example_input=SOURCE.inputs(0))
    assert {2, 4} <= set(part.boundaries)
    from pipetrain.stages.base import PartitionError

    with pytest.raises(PartitionError, match="at least 3 stages"):
        partition(mixed.build(), 2, example_input=SOURCE.inputs(0))
