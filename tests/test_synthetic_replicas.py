"""models/synthetic.py's gradient pad and the two methods the replica reduction uses on a sleep
stage: checked against the stage's closed-form maths, worked out here in float64."""
from __future__ import annotations

import numpy as np
import pytest

from models.synthetic import SleepData, SleepSequential
from pipetrain.stages.base import StageSpec

LR = 0.05


def stage_of(model: SleepSequential, index: int, start: int, end: int, *, num_stages: int = 2):
    from pipetrain.optim import Optimizer

    spec = StageSpec(index=index, num_stages=num_stages, start=start, end=end)
    return model.build_stage(spec, optimizer=Optimizer("sgd", lr=LR))


def no_sleep(**kw) -> SleepSequential:
    return SleepSequential(2, forward_ms=0, backward_ms=0, seed=3, **kw)


def last_stage(grad_bytes: int):
    return stage_of(no_sleep(grad_bytes=grad_bytes), 1, 1, 2)


def run_microbatches(stage, data: SleepData, ks, *, version: int = 0) -> list[float]:
    losses = []
    for k in ks:
        losses.append(stage.forward(k, data.inputs(k), version=version, targets=data.targets(k)))
        stage.backward(k)
    return losses


DATA = SleepData(nbytes=32, microbatch_size=1)


def test_no_pad_keeps_todays_bits():
    """grad_bytes=0: no pad in the gradients or the state, and the loss and update are the
    closed form of y = x * w, loss = mean(y * t)."""
    stage = last_stage(0)
    w0 = no_sleep().initial_weight(1)
    losses = run_microbatches(stage, DATA, [0, 1])
    grads, count = stage.accumulated_gradients()
    assert set(grads) == {"w"} and count == 2
    xs, ts = [DATA.inputs(k).astype(np.float64) for k in (0, 1)], [DATA.targets(k).astype(np.float64) for k in (0, 1)]
    assert losses[0] == pytest.approx(float(np.mean(xs[0] * w0 * ts[0])), rel=1e-6)
    expected = sum(float(np.mean(x * t)) for x, t in zip(xs, ts))  # d loss / d w, summed
    np.testing.assert_allclose(grads["w"], [expected], rtol=1e-6)
    assert not any("pad" in name for name in stage.state_dict())
    stage.update(new_version=1)
    np.testing.assert_allclose(stage.state_dict()["v1/w"], [w0 - LR * expected / 2], rtol=1e-9)


def test_pad_gradient_is_the_scale_gradient_spread_over_its_elements():
    """With a pad, s = w * (1 + mean(pad)): d loss / d pad_i = w * (d loss / d s) / n."""
    n = 1 << 10
    stage = last_stage(4 * n)
    w0 = no_sleep().initial_weight(1)
    run_microbatches(stage, DATA, [0, 1, 2])
    grads, count = stage.accumulated_gradients()
    assert count == 3 and grads["pad"].dtype == np.float32 and grads["pad"].shape == (n,)
    dloss_ds = sum(float(np.mean(DATA.inputs(k).astype(np.float64) * DATA.targets(k))) for k in range(3))
    np.testing.assert_allclose(grads["w"], [dloss_ds], rtol=1e-6)  # the pad starts at zero: factor 1
    np.testing.assert_allclose(grads["pad"], np.full(n, w0 * dloss_ds / n), rtol=1e-5)
    # An update moves the pad, and the next forward sees it: s = w1 * (1 + mean(pad1)).
    stage.update(new_version=1)
    state = stage.state_dict()
    w1, pad1 = float(state["v1/w"][0]), state["v1/pad"]
    np.testing.assert_allclose(pad1, -LR * grads["pad"] / 3, rtol=1e-6)
    loss = stage.forward(9, DATA.inputs(9), version=1, targets=DATA.targets(9))
    scale = w1 * (1 + float(np.mean(pad1, dtype=np.float64)))
    assert loss == pytest.approx(float(np.mean(DATA.inputs(9).astype(np.float64) * scale * DATA.targets(9))), rel=1e-6)


def test_pad_flows_into_the_input_gradient_of_a_middle_stage():
    model = no_sleep(grad_bytes=64)
    first = stage_of(model, 0, 0, 1)
    x = DATA.inputs(0)
    first.forward(0, x, version=0)
    g = np.full_like(x, 0.5)
    assert first.backward(0, g) is None  # the first stage sends no input gradient
    middle = stage_of(model, 1, 1, 2, num_stages=3)
    middle.load_state_dict({**middle.state_dict(), "v0/pad": np.full(16, 0.25, np.float32)})
    middle.forward(0, x, version=0)
    np.testing.assert_allclose(middle.backward(0, g), g * model.initial_weight(1) * 1.25, rtol=1e-6)


def test_update_applies_the_set_sums_over_the_set_count():
    """What the replica reduction does: replace the sums and count by the replicas' totals; the
    update then applies total / count, not this replica's own mean."""
    n = 256
    stage = last_stage(4 * n)
    run_microbatches(stage, DATA, [0])
    before = stage.state_dict()
    summed = {"w": np.array([0.3]), "pad": np.linspace(-1, 1, n, dtype=np.float32)}
    stage.set_accumulated_gradients(summed, 4)
    grads, count = stage.accumulated_gradients()
    assert count == 4
    np.testing.assert_array_equal(grads["pad"], summed["pad"])
    stage.update(new_version=1)
    after = stage.state_dict()
    np.testing.assert_allclose(after["v1/w"], before["v0/w"] - LR * 0.3 / 4, rtol=1e-12)
    np.testing.assert_allclose(after["v1/pad"], -LR * summed["pad"] / 4, rtol=1e-6)
    assert after["meta/count"] == 0 and not after["acc/pad"].any()  # the next update starts from zero


def test_two_replicas_summed_equal_one_stage_that_ran_both():
    """d=2 by hand: each replica runs half the micro-batches; their sums added and set back
    update exactly as one stage that ran all of them (the mean over d * m micro-batches)."""
    one, a, b = (last_stage(1 << 12) for _ in range(3))
    run_microbatches(one, DATA, [0, 1, 2, 3])
    run_microbatches(a, DATA, [0, 2])
    run_microbatches(b, DATA, [1, 3])
    (ga, ca), (gb, cb) = a.accumulated_gradients(), b.accumulated_gradients()
    total = {name: ga[name] + gb[name] for name in ga}
    for replica in (a, b):
        replica.set_accumulated_gradients(total, ca + cb)
    for stage in (one, a, b):
        stage.update(new_version=1)
    want = one.state_dict()
    for replica in (a, b):
        got = replica.state_dict()
        np.testing.assert_allclose(got["v1/w"], want["v1/w"], rtol=1e-12)
        np.testing.assert_allclose(got["v1/pad"], want["v1/pad"], rtol=1e-5)
    np.testing.assert_array_equal(a.state_dict()["v1/pad"], b.state_dict()["v1/pad"])  # replicas stay identical


def test_state_round_trip_with_pad_mid_accumulation():
    stage = last_stage(1 << 10)
    run_microbatches(stage, DATA, [0, 1])
    stage.update(new_version=1)
    run_microbatches(stage, DATA, [2], version=1)
    state = stage.state_dict()
    assert {"v0/pad", "v1/pad", "acc/pad", "v0/w", "v1/w", "acc/w"} <= set(state)
    fresh = last_stage(1 << 10)
    fresh.load_state_dict(state)
    assert fresh.versions() == (0, 1)
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    # Both go on the same: one more backward and update give the same bits.
    for s in (stage, fresh):
        run_microbatches(s, DATA, [3], version=1)
        s.update(new_version=2)
        s.release(0)
    np.testing.assert_array_equal(fresh.state_dict()["v2/pad"], stage.state_dict()["v2/pad"])
    assert "v0/pad" not in fresh.state_dict()  # release drops a version's pad with its weights


def test_mismatches_are_clear_errors():
    stage = last_stage(64)
    with pytest.raises(ValueError, match=r"stage 1: set_accumulated_gradients got \['w'\]"):
        stage.set_accumulated_gradients({"w": np.zeros(1)}, 2)
    with pytest.raises(ValueError, match="gradient 'pad' has shape"):
        stage.set_accumulated_gradients({"w": np.zeros(1), "pad": np.zeros(3, np.float32)}, 2)
    with pytest.raises(ValueError, match="lacks a pad"):
        stage.load_state_dict(last_stage(0).state_dict())
    with pytest.raises(ValueError, match="grad_bytes must be >= 0"):
        SleepSequential(2, grad_bytes=-4)


@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_pad_trains_in_a_pipeline_and_a_zero_pad_run_has_no_pad(schedule):
    """The reference executor runs the pad through every weight version a schedule keeps
    (pipedream: several at once); its final state holds the newest pad, moved off zero, and the
    run without a pad is the same model's losses at step 0 (the pad starts at zero)."""
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    data = SleepData(nbytes=256)
    runs = {}
    for grad_bytes in (0, 1 << 12):
        part = partition(no_sleep(grad_bytes=grad_bytes), 2, method="uniform", example_input=data.inputs(0))
        runs[grad_bytes] = fit(part, data, executor="reference", schedule=schedule, microbatches=4, steps=3,
                               optimizer=Optimizer("sgd", lr=0.5), progress=False)
    plain, padded = runs[0], runs[1 << 12]
    assert not any("pad" in name for state in plain.states for name in state)
    for state in padded.states:
        pads = [name for name in state if name.endswith("/pad") and name.startswith("v")]
        assert pads and all(state[name].shape == (1 << 10,) for name in pads)
        assert np.abs(state[max(pads, key=lambda n: int(n[1:].split("/")[0]))]).max() > 0
    first = range(4) if schedule == "1f1b" else range(1)  # pipedream updates after micro-batch 0
    assert [padded.losses[k] for k in first] == [plain.losses[k] for k in first]  # no update yet: same bits
    assert padded.losses[11] != plain.losses[11]


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_padded_pipeline_on_dask_equals_the_reference_bit_for_bit():
    """Real worker processes: the pad's versions, sums and updates are the same bits as in the
    reference executor, and come back in the final states (pipedream keeps several versions)."""

    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    data = SleepData(nbytes=1 << 12)
    model = SleepSequential(2, forward_ms=1, backward_ms=2, grad_bytes=1 << 16)
    part = partition(model, 2, method="uniform", example_input=data.inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=4, steps=3, optimizer=Optimizer("sgd", lr=0.5), progress=False)
    dask_run = _dask_equals_reference(part, data, workers=2, **kwargs)
    assert all(any(name.endswith("/pad") for name in state) for state in dask_run.states)


def test_two_replicas_of_the_padded_pipeline_equal_one_with_twice_the_microbatches():
    """fit(replicas=2) through the stage's accumulated_gradients / set_accumulated_gradients:
    each sync update is the mean over the d * m micro-batches, so the run equals one pipeline
    with 2m micro-batches per step (within float32: the sums add in another order)."""
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    data = SleepData(nbytes=256)
    part = partition(no_sleep(grad_bytes=1 << 12), 2, method="uniform", example_input=data.inputs(0))
    common = dict(executor="reference", schedule="1f1b", steps=3, optimizer=Optimizer("sgd", lr=0.5), progress=False)
    replicated = fit(part, data, microbatches=4, replicas=2, **common)
    single = fit(part, data, microbatches=8, **common)
    assert sorted(replicated.losses) == sorted(single.losses) == list(range(24))
    np.testing.assert_allclose([replicated.losses[k] for k in range(24)], [single.losses[k] for k in range(24)],
                               rtol=1e-6)
    for got, want in zip(replicated.states, single.states, strict=True):
        newest = max(int(name[1:].split("/")[0]) for name in want if name.startswith("v"))
        np.testing.assert_allclose(got[f"v{newest}/w"], want[f"v{newest}/w"], rtol=1e-9)
        np.testing.assert_allclose(got[f"v{newest}/pad"], want[f"v{newest}/pad"], rtol=1e-5)
        assert np.abs(got[f"v{newest}/pad"]).max() > 0


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_replicated_padded_pipeline_on_dask_equals_the_reference_bit_for_bit():
    """d = 2 x p = 2 real worker processes summing 64 KiB pads: the reference executor's bits."""

    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    data = SleepData(nbytes=1 << 12)
    part = partition(SleepSequential(2, forward_ms=1, backward_ms=2, grad_bytes=1 << 16), 2, method="uniform",
                     example_input=data.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, replicas=2, optimizer=Optimizer("sgd", lr=0.5),
                  progress=False)
    dask_run = _dask_equals_reference(part, data, workers=4, **kwargs)
    assert sorted(dask_run.losses) == list(range(24))  # every job micro-batch once, d * m per step


def _dask_equals_reference(part, data, *, workers: int, **kwargs):
    """``fit`` on a fresh local cluster of ``workers`` processes, checked bit for bit against the
    reference executor; returns the Dask run."""
    from distributed import Client

    from pipetrain.api import fit
    from pipetrain.runtime.local import start_local_cluster
    from stage_helpers import assert_runs_equal

    cluster = start_local_cluster(workers)
    try:
        with Client(cluster) as client:
            dask_run = fit(part, data, client=client, **kwargs)
    finally:
        cluster.close()
    assert_runs_equal(dask_run, fit(part, data, executor="reference", **kwargs))
    return dask_run
