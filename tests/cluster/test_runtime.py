"""The Dask runtime against the reference executor, with real worker processes.

A distributed run's numbers are a function of the schedule only, never of
timing: losses and final states (every weight version, optimizer state,
accumulator) equal the single-process reference executor's bit for bit.
"""
import numpy as np
import pytest

from models import mlp
from models.synthetic import SleepData, SleepSequential
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.cluster]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_jax_pipeline_equals_reference_bit_for_bit(client, schedule):
    source = mlp.source(1024, microbatch_size=16, seed=1)
    part = partition(mlp.build(sizes=(32, 32, 32)), 3, method="params", example_input=source.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=5, optimizer=Optimizer("adam", lr=3e-3), progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    reference = fit(part, source, executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    assert len(dask_run.history) == 5 and dask_run.history[-1]["loss"] < dask_run.history[0]["loss"]


def test_sleep_pipeline_streams_and_matches_reference(client):
    data = SleepData(nbytes=64 << 10)
    model = SleepSequential(4, forward_ms=2, backward_ms=4)
    part = partition(model, 4, method="uniform", example_input=data.inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=8, steps=3, optimizer=Optimizer("sgd", lr=0.05), progress=False)
    dask_run = fit(part, data, client=client, **kwargs)
    assert_runs_equal(dask_run, fit(part, data, executor="reference", **kwargs))
    # Every stage ran the forward and backward of all 24 micro-batches and
    # recorded them on its own worker process.
    for events in dask_run.events:
        for kind in ("F", "B"):
            assert sorted(events["k"][events["kind"] == kind].tolist()) == list(range(24))


def test_a_new_run_refuses_a_checkpoint_directory_another_run_owns(client, tmp_path):
    from pipetrain.runtime.driver import CheckpointDirInUse

    source = mlp.source(256, microbatch_size=8)
    part = partition(mlp.build(), 2, example_input=source.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=2, steps=2, optimizer=Optimizer("sgd", lr=0.1), progress=False,
                  checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    first = fit(part, source, client=client, **kwargs)
    assert len(first.history) == 2
    with pytest.raises(CheckpointDirInUse, match=r"ckpt already belongs to a run \(generation 0, checkpoints up to "
                                                 r"micro-batch 4\): continue it with resume=True"):
        fit(part, source, client=client, **kwargs)
    resumed = fit(part, source, client=client, resume=True, **{**kwargs, "steps": 3})  # what the error proposes
    assert [h["step"] for h in resumed.history] == [0, 1, 2]  # steps 0-1 restored from the checkpoint


@pytest.mark.parametrize("schedule", ["pipedream", "2bw"])
def test_fit_trains_a_finished_async_run_further(client, tmp_path, schedule):
    # A finished run's final checkpoint holds only its newest weight version: fit(resume=True)
    # with more steps starts the pipeline again, empty, there (it failed: "no weight version").
    from dataclasses import replace

    from pipetrain.jobspec import JobSpec

    source = mlp.source(512, microbatch_size=8, seed=2)
    part = partition(mlp.build(), 2, example_input=source.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, optimizer=Optimizer("sgd", lr=0.1), progress=False,
                  checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    fit(part, source, client=client, steps=2, **kwargs)
    resumed = fit(part, source, client=client, resume=True, steps=3, **kwargs)
    assert resumed.resumed_from == 8 and [h["step"] for h in resumed.history] == [0, 1, 2]

    spec = JobSpec.from_settings(steps=3, **{k: v for k, v in kwargs.items() if k != "progress"})
    spec = replace(spec, schedule=replace(spec.schedule, restart_at=8))
    assert_runs_equal(resumed, fit(part, source, executor="reference", spec=spec, progress=False))


def test_bad_schedule_fails_before_any_worker_starts(client):
    source = mlp.source(256, microbatch_size=8)
    part = partition(mlp.build(), 2, example_input=source.inputs(0))
    with pytest.raises(ValueError, match="2bw"):
        fit(part, source, client=client, schedule="2bw", microbatches=1, steps=1, progress=False)


def test_a_boundary_that_does_not_match_the_partition_names_both_stages_and_the_tensor(client):
    import jax.numpy as jnp

    from pipetrain.stages.jax_layers import Layer
    from pipetrain.stages.jax_stage import JaxSequential

    def narrows_on_micro_batch_3(params, x):
        # Traced with float32; from the 4th micro-batch (8 rows) on, emits float16.
        return x.astype(jnp.float16) if x.shape[0] == 8 else x

    x = np.ones((4, 3), np.float32)

    class Source:
        microbatch_size = 4

        def inputs(self, k):
            return np.ones((8 if k >= 3 else 4, 3), np.float32)

        def targets(self, k):
            return np.ones((8 if k >= 3 else 4, 3), np.float32)

    layers = [Layer("cast", lambda key, spec: {}, narrows_on_micro_batch_3),
              Layer("scale", lambda key, spec: {"w": jnp.ones(())}, lambda p, x: x * p["w"])]
    model = JaxSequential(layers, loss=lambda out, t: jnp.mean((out - t) ** 2), example_input=x)
    part = partition(model, 2, method="uniform", example_input=x)
    from pipetrain.runtime.driver import JobFailed

    with pytest.raises(JobFailed) as failure:
        fit(part, Source(), client=client, schedule="1f1b", microbatches=2, steps=3, max_restarts=3,
            progress=False, job_id="narrows")
    message = str(failure.value)
    assert "stage 0 -> stage 1: tensor <value> is float16[8,3] but stage 1 expects float32[None,3]" in message
    # A mistake in the stage's own computation is not retried (max_restarts=3).
    assert "a restart would fail the same way" in message
    # It is logged as the error it is; stage 0, only stopped because of it, ends quietly.
    failed = [m for logs in client.get_worker_logs().values() for _, m in logs
              if "Compute Failed" in m and "pipetrain-narrows-" in m]
    assert len(failed) == 1 and "pipetrain-narrows-g0-stage1" in failed[0] and "BoundaryMismatch" in failed[0], failed


# Who the driver blames for a loss (a lost peer, a worker that left, a stage's own
# error) is the job core's decision, tested without a cluster in tests/test_job_core.py.
