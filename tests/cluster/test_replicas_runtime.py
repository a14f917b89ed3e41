"""Replicated pipelines on real worker processes: p = 2 stages x d = 2 replicas, four tasks.

The Dask run equals the reference executor running the same replica layout, bit for
bit, for every schedule and for a JAX -> torch pipeline; every micro-batch of the job
reaches every stage's weights exactly once (the ledgers, in the job's ids); a checkpoint
stores each stage once; and a job checkpointed with d replicas resumes with another d,
equal (float tolerance) to one pipeline trained on the same micro-batches."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models import mixed, mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SOURCE = mlp.source(1024, microbatch_size=16, seed=1)
ADAM = Optimizer("adam", lr=1e-2)


def _part():
    return partition(mlp.build(sizes=(32, 32)), 2, method="params", example_input=SOURCE.inputs(0))


def _assert_exactly_once(result, total: int) -> None:
    for task, ledger in enumerate(result.ledgers):
        counts = Counter(k for first, end in ledger["applied"] for k in range(first, end))
        assert sorted(counts) == list(range(total)) and set(counts.values()) == {1}, f"task {task}"
        assert ledger["pending"] == []


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_two_replicas_equal_the_reference_bit_for_bit(client, schedule):
    kwargs = dict(schedule=schedule, microbatches=4, steps=3, optimizer=ADAM, progress=False, replicas=2)
    dask_run = fit(_part(), SOURCE, client=client, **kwargs)
    reference = fit(_part(), SOURCE, executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    assert sorted(dask_run.losses) == list(range(3 * 4 * 2))  # the job's ids: both replicas' micro-batches
    assert len(dask_run.ledgers) == 4 and len(dask_run.states) == 2
    _assert_exactly_once(dask_run, 24)
    assert [h["step"] for h in dask_run.history] == [0, 1, 2]


def test_a_mixed_jax_torch_pipeline_with_two_replicas(client):
    pytest.importorskip("torch")
    source = mixed.train_source(n=512, microbatch_size=16)
    part = partition(mixed.build_jax_torch(), 2, example_input=source.inputs(0))
    assert [p.framework for p in part.model.parts] == ["jax", "torch"]
    kwargs = dict(schedule="1f1b", microbatches=4, steps=2, optimizer=Optimizer("momentum", lr=0.05),
                  progress=False, replicas=2)
    assert_runs_equal(fit(part, source, client=client, **kwargs), fit(part, source, executor="reference", **kwargs))


def _sgd_oracle(batches_per_step: list[list[int]], lr: float) -> list[np.ndarray]:
    """Plain SGD on the unpartitioned model: each step the mean gradient of its micro-batches."""
    import jax

    from oracles import full_gradient, initial_params

    layers = mlp.layers(sizes=(32, 32))
    params = initial_params(layers, SOURCE.inputs(0))
    for ks in batches_per_step:
        grads = full_gradient(layers, mlp.loss_fn, params, [(SOURCE.inputs(k), SOURCE.targets(k)) for k in ks])
        params = jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoints_store_each_stage_once_and_resume_with_other_replicas(client, tmp_path, first, then):
    m, lr = 4, 0.1
    ckpt = tmp_path / "checkpoints"
    kwargs = dict(schedule="1f1b", microbatches=m, optimizer=Optimizer("sgd", lr=lr), progress=False,
                  checkpoint_dir=str(ckpt), job_id="relayout")
    # 16 of the job's micro-batches with `first` replicas (2 or 4 steps), then to 32 with `then`
    before = fit(_part(), SOURCE, client=client, replicas=first, steps=16 // (m * first),
                 checkpoint_every=m * first, **kwargs)
    _assert_exactly_once(before, 16)
    for step in sorted(ckpt.glob("step-*")):
        assert sorted(p.name for p in step.glob("stage-*.safetensors")) == ["stage-0.safetensors",
                                                                              "stage-1.safetensors"]
    after = fit(_part(), SOURCE, client=client, replicas=then, steps=32 // (m * then), resume=True,
                checkpoint_every=m * then, **kwargs)
    assert after.resumed_from == 16
    _assert_exactly_once(after, 32)
    assert sorted(after.losses) == list(range(32))
    steps = [list(range(t * m * first, (t + 1) * m * first)) for t in range(16 // (m * first))]
    steps += [list(range(16 + t * m * then, 16 + (t + 1) * m * then)) for t in range(16 // (m * then))]
    want = _sgd_oracle(steps, lr)
    got = [after.states[s][name] for s in range(2) for name in sorted(after.states[s])
           if name.startswith(f"v{int(after.states[s]['meta/latest'])}/")]
    assert len(got) == len(want)
    assert sorted(float(np.abs(g).sum()) for g in got) == pytest.approx(
        sorted(float(np.abs(w).sum()) for w in want), rel=1e-4)


def test_a_checkpoint_that_is_no_cut_of_the_new_layout_is_refused(client, tmp_path):
    ckpt = tmp_path / "checkpoints"
    kwargs = dict(schedule="1f1b", microbatches=4, optimizer=Optimizer("sgd", lr=0.1), progress=False,
                  checkpoint_dir=str(ckpt))
    fit(_part(), SOURCE, client=client, replicas=1, steps=3, checkpoint_every=4, **kwargs)  # cut 12
    with pytest.raises(Exception, match="not a cut of 2 replica"):
        fit(_part(), SOURCE, client=client, replicas=2, steps=4, resume=True, checkpoint_every=8, **kwargs)
    assert Path(ckpt / "step-0000000012" / "COMMITTED").exists()  # kept for the resume that fits


@pytest.mark.parametrize("p", [1, 2])
def test_torch_replicas_with_streamed_gradient_buckets_equal_the_reference_bit_for_bit(client, p):
    """Small buckets (5 KB: two or more per stage) over the real transport: the update's last
    backward sends them while it runs, each replica channel has credit for two updates' parts."""
    pytest.importorskip("torch")
    from pipetrain.stages import replica_grads
    from test_replica_buckets import SOURCE as TORCH_SOURCE, _part as torch_part

    part = torch_part(p, split_backward=False)
    stage = part.model.build_stage(part.specs()[0], optimizer=ADAM)
    assert len(replica_grads.buckets(stage, bucket_bytes=5000)) >= 2
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, optimizer=ADAM, progress=False, replicas=2,
                  reduce_bucket_mib=5000 / (1 << 20))
    dask_run = fit(part, TORCH_SOURCE, client=client, **kwargs)
    assert_runs_equal(dask_run, fit(part, TORCH_SOURCE, executor="reference", **kwargs))
    assert_runs_equal(dask_run, fit(part, TORCH_SOURCE, executor="reference", **{**kwargs, "reduce_bucket_mib": 64}))
    _assert_exactly_once(dask_run, 3 * 4 * 2)


@pytest.mark.parametrize("framework,d,schedule", [("jax", 3, "pipedream"), ("torch", 4, "1f1b")])
def test_scatter_replicas_equal_the_direct_reference_bit_for_bit(client, framework, d, schedule):
    """d = 3 and 4 (one worker each, p = 1): each replica sums a d-th of every gradient and
    shares that sum over the real transport (torch: 5 KB buckets streamed during the backward);
    the run equals the reference executor's direct exchange bit for bit."""
    if framework == "torch":
        pytest.importorskip("torch")
        from test_replica_buckets import SOURCE as source, _part as torch_part

        part, extra = torch_part(1, split_backward=False), {"reduce_bucket_mib": 5000 / (1 << 20)}
    else:
        source, extra = SOURCE, {}
        part = partition(mlp.build(sizes=(32, 32)), 1, example_input=SOURCE.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=3, optimizer=ADAM, progress=False, replicas=d, **extra)
    dask_run = fit(part, source, client=client, reduce_exchange="scatter", **kwargs)
    assert_runs_equal(dask_run, fit(part, source, executor="reference", reduce_exchange="direct", **kwargs))
    _assert_exactly_once(dask_run, 3 * 4 * d)
