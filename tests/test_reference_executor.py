"""The reference executor against oracles written from the definitions.

- gpipe / 1f1b: the accumulated gradient of every stage equals the gradient
  of the unpartitioned model on the same mini-batch, for 1-4 stages and
  uneven cuts (float32, rtol 1e-5).
- pipedream / 2bw: every weight version of every stage equals the published
  update rule run as a plain loop (tests/oracles.py), and so does each delay
  correction (weight prediction, DC-ASGD-c, DC-ASGD-a) with SGD, momentum and
  Adam, written there in numpy from the papers' definitions.
- A run rebuilt from a checkpoint cut continues bit for bit (what recovery
  relies on).
"""
from dataclasses import replace

import jax
import numpy as np
import pytest

from models import mlp
from oracles import NumpyOptimizer, async_rule_weights, corrected_async_weights, full_gradient, initial_params
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import build_schedule

LAYERS = mlp.layers(sizes=(12, 10, 8))  # dense0 act0 dense1 act1 dense2 act2 dense3: 7 layers
SOURCE = mlp.source(512, microbatch_size=8, seed=3)


def _model():
    from pipetrain.stages.jax_stage import JaxSequential

    return JaxSequential(LAYERS, loss=mlp.loss_fn, seed=0)


def _stages(boundaries, optimizer):
    part = partition(_model(), len(boundaries) + 1, boundaries=list(boundaries) or None,
                     example_input=SOURCE.inputs(0))
    return part, build_stages(part, optimizer)


def _named(layer_params: dict) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(layer_params)[0]}


def _without_updates(schedule):
    return replace(schedule, actions=tuple(tuple(a for a in acts if a.kind is not Kind.UPDATE)
                                           for acts in schedule.actions))


@pytest.mark.parametrize("schedule_name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("boundaries", [(), (3,), (2, 5), (1, 3, 5), (1, 2, 6), (6,)])
def test_sync_gradient_equals_unpartitioned(schedule_name, boundaries):
    m = 4
    part, stages = _stages(boundaries, Optimizer("sgd", lr=0.1))
    schedule = _without_updates(build_schedule(schedule_name, num_stages=len(stages), microbatches=m, steps=1))
    run_reference(schedule, stages=stages, source=SOURCE)

    params = initial_params(LAYERS, SOURCE.inputs(0))
    oracle = full_gradient(LAYERS, mlp.loss_fn, params, [(SOURCE.inputs(k), SOURCE.targets(k)) for k in range(m)])
    names = _model().layer_names()
    expected = _named({names[i]: g for i, g in enumerate(oracle)})
    got = {}
    for stage in stages:
        state = stage.state_dict()
        count = int(state["meta/count"])
        assert count == m
        got.update({name[len("acc/"):]: state[name] / count for name in state if name.startswith("acc/")})
    expected = {name.replace("['", "").replace("']", "/").rstrip("/"): v for name, v in expected.items()}
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("schedule_name,num_stages,accumulate", [
    ("pipedream", 3, 1), ("pipedream", 4, 1), ("pipedream", 3, 2), ("2bw", 3, 1), ("2bw", 4, 1)])
def test_async_weights_follow_published_rule(schedule_name, num_stages, accumulate):
    m, steps, lr = 4, 3, 0.2
    boundaries = {3: (2, 4), 4: (1, 3, 5)}[num_stages]
    part, stages = _stages(boundaries, Optimizer("sgd", lr=lr))
    schedule = build_schedule(schedule_name, num_stages=num_stages, microbatches=m, steps=steps,
                              accumulate=accumulate, checkpoint_every=m)
    result = run_reference(schedule, stages=stages, source=SOURCE, keep_checkpoints=True)

    ranges = [(s.start, s.end) for s in part.specs()]
    oracle = async_rule_weights(LAYERS, mlp.loss_fn, initial_params(LAYERS, SOURCE.inputs(0)), ranges, SOURCE,
                                schedule=schedule_name, microbatches=m, steps=steps, accumulate=accumulate, lr=lr)
    names = _model().layer_names()
    compared = 0
    for cut, per_stage in sorted(result.checkpoints.items()):
        for s, state in per_stage.items():
            for v in np.asarray(state["meta/versions"]).tolist():
                a, _ = ranges[s]
                for i, layer_params in enumerate(oracle[s][v]):
                    for key, want in layer_params.items():
                        got = state[f"v{v}/{names[a + i]}/{key}"]
                        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6,
                                                   err_msg=f"stage {s} version {v} {names[a + i]}/{key} at cut {cut}")
                        compared += 1
    # The last versions too: the run's final weights are the rule's.
    for s, stage in enumerate(stages):
        assert max(stage.versions()) == len(oracle[s]) - 1
    assert compared > 0


RESUMED = [("gpipe", "none"), ("1f1b", "none"), ("pipedream", "none"), ("2bw", "none"),
           ("pipedream", "predict"), ("2bw", "predict"), ("pipedream", "dcasgd"), ("2bw", "dcasgd-a")]


@pytest.mark.parametrize("schedule_name,correction", RESUMED)
def test_resume_from_a_cut_is_bit_identical(schedule_name, correction):
    # A correction's state (the last step, DC-ASGD-a's mean square) is in the checkpoint.
    m, steps, cut = 4, 4, 8
    optimizer = Optimizer("adam", lr=0.01, correction=correction)
    full_schedule = build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps, checkpoint_every=m)
    _, stages = _stages((2, 4), optimizer)
    full = run_reference(full_schedule, stages=stages, source=SOURCE, keep_checkpoints=True)

    _, fresh = _stages((2, 4), optimizer)
    for s, stage in enumerate(fresh):
        stage.load_state_dict(full.checkpoints[cut][s])
    resumed_schedule = build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps, checkpoint_every=m,
                                      first_microbatch=cut)
    resumed = run_reference(resumed_schedule, stages=fresh, source=SOURCE)

    assert {k: v for k, v in full.losses.items() if k >= cut} == resumed.losses
    for a, b in zip(full.state_dicts(), resumed.state_dicts()):
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), name


def _flat_stages(params: list, ranges, names) -> list[dict]:
    """Layer params as each stage's flat state names, ``{layer}/{key}``."""
    return [{f"{names[i]}/{key}": np.asarray(x) for i in range(a, b) for key, x in params[i].items()}
            for a, b in ranges]


def _chain_grad_fn(ranges, names):
    """k, flat weights per stage -> flat gradients per stage of the unpartitioned chain."""
    from models.layers import apply_sequence

    def loss_of(flat, x, y):
        params = [{key.split("/", 1)[1]: v for key, v in flat[s].items() if key.split("/")[0] == names[i]}
                  for s, (a, b) in enumerate(ranges) for i in range(a, b)]
        return mlp.loss_fn(apply_sequence(LAYERS, params, x), y)

    grad = jax.jit(jax.grad(loss_of))
    return lambda k, weights: grad(weights, SOURCE.inputs(k), SOURCE.targets(k))


CORRECTED = [("pipedream", 1), ("pipedream", 2), ("2bw", 1)]
LAMBDA = {"predict": 0.0, "dcasgd": 20.0, "dcasgd-a": 1.0}  # large, so that the correction shows


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("correction", ["predict", "dcasgd", "dcasgd-a"])
@pytest.mark.parametrize("schedule_name,accumulate", CORRECTED)
def test_corrected_async_weights_follow_the_definitions(schedule_name, accumulate, correction, optimizer):
    m, steps, lr = 4, 3, {"adam": 0.01}.get(optimizer, 0.2)
    opt = Optimizer(optimizer, lr=lr, correction=correction, dc_lambda=LAMBDA[correction] or None)
    part, stages = _stages((2, 4), opt)
    schedule = build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps, accumulate=accumulate)
    run_reference(schedule, stages=stages, source=SOURCE)

    ranges, names = [(s.start, s.end) for s in part.specs()], _model().layer_names()
    params0 = _flat_stages(initial_params(LAYERS, SOURCE.inputs(0)), ranges, names)
    kwargs = dict(schedule=schedule_name, microbatches=m, steps=steps, accumulate=accumulate, lam=LAMBDA[correction])
    oracle = corrected_async_weights(_chain_grad_fn(ranges, names), params0, correction=correction,
                                     optimizers=[NumpyOptimizer(optimizer, lr) for _ in ranges], **kwargs)
    plain = corrected_async_weights(_chain_grad_fn(ranges, names), params0, correction="none",
                                    optimizers=[NumpyOptimizer(optimizer, lr) for _ in ranges], **kwargs)
    rtol, atol, moved = 1e-4, 2e-6, 0.0
    for s, stage in enumerate(stages):
        state = stage.state_dict()
        assert max(stage.versions()) == len(oracle[s]) - 1
        for n, want in oracle[s][-1].items():
            np.testing.assert_allclose(state[f"v{len(oracle[s]) - 1}/{n}"], want, rtol=rtol, atol=atol,
                                       err_msg=f"stage {s} {n}")
            # How far the correction moved the weights, in units of the tolerance.
            moved = max(moved, float((np.abs(want - plain[s][-1][n]) / (atol + rtol * np.abs(want))).max()))
    assert moved > 10
